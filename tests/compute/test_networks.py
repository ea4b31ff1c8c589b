"""Group networks (labs/compute/networks.py): subnets, VNIs, host and VM addresses and MACs
allocated once and uniquely; only hosts marked for group networks give VMs a group NIC; a
provision on libvirt's test driver makes the group's network with the VM's DHCP and DNS
entries, a second VM is added to it, a deleted one taken out and its address freed."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import ipaddress
import json

import pytest
from django.db import IntegrityError, transaction

from labs.compute import networks, runner
from labs.compute.executors import vm_seed, vm_spec
from labs.compute.ssh_access import access_wanted
from labs.drivers import cloudinit
from labs.drivers.registry import driver_for
from labs.errors import Refused
from labs.models import GroupNetwork, Vm
from tests.compute.test_vms import (  # noqa: F401 - fixture
    approve,
    image,  # noqa: F401 - fixture
    make_host,
    template,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def net_host(tmp_path):
    return make_host("h1", tmp_path=tmp_path, group_networks=True)


def run(op):
    outcome = runner.operation_run(operation_id=op.pk, worker="w/1", may_retry=False)
    op.refresh_from_db()
    assert op.status == "succeeded", (outcome, op.error)
    return op


def test_each_group_gets_its_own_slash_24_of_the_pool_and_its_own_vni(group_a, group_b, settings):
    settings.GROUP_NETWORK_POOL = "10.200.0.0/16"
    a = networks.group_network_get(group=group_a)
    b = networks.group_network_get(group=group_b)
    assert (a.subnet, b.subnet) == ("10.200.0.0/24", "10.200.1.0/24")
    assert a.vni != b.vni and a.vni >= settings.GROUP_NETWORK_VNI_BASE
    assert networks.group_network_get(group=group_a) == a  # allocated once


def test_a_full_pool_is_refused_with_a_clear_message(group_a, group_b, settings):
    settings.GROUP_NETWORK_POOL = "10.200.0.0/24"
    networks.group_network_get(group=group_a)
    with pytest.raises(Refused, match="no free /24 left in GROUP_NETWORK_POOL"):
        networks.group_network_get(group=group_b)
    assert not GroupNetwork.objects.filter(group=group_b).exists()


def test_subnets_and_vnis_are_unique_in_the_database(group_a, group_b):
    a = networks.group_network_get(group=group_a)
    with pytest.raises(IntegrityError), transaction.atomic():
        GroupNetwork.objects.create(group=group_b, subnet=a.subnet, vni=a.vni + 1)
    with pytest.raises(IntegrityError), transaction.atomic():
        GroupNetwork.objects.create(group=group_b, subnet="10.201.0.0/24", vni=a.vni)


def test_a_host_not_marked_for_group_networks_gives_no_group_nic(
    group_a, ines, template, tmp_path
):
    make_host("plain", tmp_path=tmp_path)  # group_networks off: the default
    [vm] = approve(group_a, ines)
    assert networks.vm_network_join(vm=vm) is False
    assert vm_spec(vm).group_nic is None
    assert "network-config" not in cloudinit.seed_read(vm_seed(vm, access_wanted(vm)))
    assert not GroupNetwork.objects.exists()


def test_group_networks_off_in_settings_gives_no_group_nic(
    group_a, ines, template, net_host, settings
):
    settings.GROUP_NETWORKS = False
    [vm] = approve(group_a, ines)
    assert networks.vm_network_join(vm=vm) is False and vm_spec(vm).group_nic is None


def test_vms_get_distinct_addresses_from_dot_16_and_distinct_macs(
    group_a, ines, template, net_host, make_vm
):
    [vm1] = approve(group_a, ines)
    vm2 = make_vm(group_a, name="vm2", host=net_host)
    assert networks.vm_network_join(vm=vm1) and networks.vm_network_join(vm=vm2)
    subnet = ipaddress.IPv4Network(networks.group_network_get(group=group_a).subnet)
    assert [vm1.group_ip, vm2.group_ip] == [str(subnet[16]), str(subnet[17])]
    assert vm1.group_mac != vm2.group_mac and vm1.group_mac.startswith("52:54:01:")
    networks.vm_network_join(vm=vm1)  # kept, not allocated again
    assert Vm.objects.get(pk=vm1.pk).group_ip == str(subnet[16])
    with pytest.raises(IntegrityError), transaction.atomic():
        Vm.objects.filter(pk=vm2.pk).update(group_ip=vm1.group_ip)
    with pytest.raises(IntegrityError), transaction.atomic():
        Vm.objects.filter(pk=vm2.pk).update(group_mac=vm1.group_mac)


def test_each_host_of_a_group_gets_its_own_address_in_the_reserved_block(
    group_a, ines, template, net_host, tmp_path
):
    [vm] = approve(group_a, ines)
    networks.vm_network_join(vm=vm)
    other = make_host("h2", tmp_path=tmp_path, group_networks=True)
    one = networks.network_spec(group=group_a, host=net_host)
    two = networks.network_spec(group=group_a, host=other)
    subnet = ipaddress.IPv4Network(one.subnet)
    assert (one.gateway, two.gateway) == (str(subnet[1]), str(subnet[2]))
    assert networks.network_spec(group=group_a, host=net_host).gateway == one.gateway


def test_the_seed_of_a_vm_with_a_group_nic_brings_up_both_nics_by_mac(
    group_a, ines, template, net_host
):
    [vm] = approve(group_a, ines)
    networks.vm_network_join(vm=vm)
    files = cloudinit.seed_read(vm_seed(vm, access_wanted(vm)))
    network = json.loads(files["network-config"])
    slirp, group = network["config"]
    assert network["version"] == 1
    assert (slirp["mac_address"], slirp["subnets"][0]["type"]) == (cloudinit.SLIRP_MAC, "static")
    assert (group["mac_address"], group["subnets"]) == (vm.group_mac, [{"type": "dhcp"}])


def test_a_tunnel_floods_to_the_groups_other_hosts_only(
    group_a, group_b, ines, template, net_host, tmp_path, make_vm
):
    Vm.objects.all().delete()
    h1 = net_host
    h1.tunnel_address = "10.254.0.1"
    h1.save()
    h2 = make_host("h2", tmp_path=tmp_path, group_networks=True, tunnel_address="10.254.0.2")
    h2.vxlan_port = 4790
    h2.save()
    vm1 = make_vm(group_a, name="vm1", host=h1)
    vm2 = make_vm(group_a, name="vm2", host=h2)
    other = make_vm(group_b, name="vm1", host=h2)
    for vm in (vm1, vm2, other):
        networks.vm_network_join(vm=vm)
    spec = networks.network_spec(group=group_a, host=h1)
    assert spec.tunnel.local == "10.254.0.1" and spec.tunnel.port == 4789
    assert [(p.address, p.port) for p in spec.tunnel.peers] == [("10.254.0.2", 4790)]
    assert spec.tunnel.vni == networks.group_network_get(group=group_a).vni
    assert {h.name for h in spec.hosts} == {"vm1", "vm2"}  # not group B's vm1
    assert other.group_ip not in {h.ip for h in spec.hosts}


def test_provision_makes_the_network_on_the_host_and_a_second_vm_joins_it_live(
    group_a, ines, template, net_host, sent
):
    [vm1] = approve(group_a, ines)
    run(vm1.operations.get())
    vm1.refresh_from_db()
    driver = driver_for(net_host)
    name = networks.group_network_get(group=group_a).libvirt_name
    assert driver.network_names() == [name]
    from labs.drivers.libvirt.xml import network_hosts, parse

    net = driver._conn.networkLookupByName(name)
    assert net.isActive() and net.bridgeName() == f"stxg{group_a.pk}"
    hosts = network_hosts(net.XMLDesc(0))
    assert {(h.mac, h.ip, h.name) for h in hosts["dhcp"]} == {(vm1.group_mac, vm1.group_ip, "vm1")}
    assert hosts["dns"] == {(vm1.group_ip, "vm1")}
    nic = parse(driver._conn.lookupByName(vm1.domain_name).XMLDesc(0)).find(
        "./devices/interface[@type='network']"
    )
    assert nic.find("source").get("network") == name
    assert nic.find("mac").get("address") == vm1.group_mac
    # The group's firewall, which includes stratus-group.
    assert nic.find("filterref").get("filter") == f"stratus-fw-g{group_a.pk}"

    from labs.compute import requests

    vm2 = requests.vm_create(group=group_a, by=ines)
    run(vm2.operations.get())
    vm2.refresh_from_db()
    hosts = network_hosts(net.XMLDesc(0))
    assert {h.name for h in hosts["dhcp"]} == {"vm1", "vm2"}
    assert (vm2.group_ip, "vm2") in hosts["dns"]

    from labs.choices import OperationKind
    from labs.compute import dispatch

    op = dispatch.operation_create(vm=vm2, kind=OperationKind.DELETE, by=ines)
    run(op)
    vm2.refresh_from_db()
    assert vm2.group_ip is None  # its address is free again
    hosts = network_hosts(net.XMLDesc(0))
    assert {h.name for h in hosts["dhcp"]} == {"vm1"} and hosts["dns"] == {(vm1.group_ip, "vm1")}

    op = dispatch.operation_create(vm=vm1, kind=OperationKind.DELETE, by=ines)
    run(op)
    assert driver.network_names() == []  # the group's last VM here: the network goes


# --- moves and the end of term's archive ------------------------------------------------------


def _network_of(driver, group):
    from labs.drivers.libvirt.xml import network_hosts

    name = networks.group_network_get(group=group).libvirt_name
    if name not in driver.network_names():
        return None
    return {
        h.name for h in network_hosts(driver._conn.networkLookupByName(name).XMLDesc(0))["dhcp"]
    }


def test_a_move_to_a_host_without_group_networks_is_refused_with_the_reason(
    group_a, ines, template, net_host, tmp_path, sent
):
    from labs.compute.moves import vm_move_request

    [vm1] = approve(group_a, ines)
    run(vm1.operations.get())
    plain = make_host("h2", tmp_path=tmp_path, ssh_port_min=30100, ssh_port_max=30109)
    with pytest.raises(Refused, match="Host h2 has no group networks: vm1 would lose its NIC"):
        vm_move_request(vm=Vm.objects.get(pk=vm1.pk), to=plain, by=ines)


def test_a_moved_vm_is_on_the_network_of_its_new_host_and_the_old_one_goes_with_the_last(
    group_a, ines, template, net_host, tmp_path, sent
):
    """What a move does to the group's network once the VM is on its destination (the
    move's disk copy itself is the two-host integration test's): the destination's
    network lists the group, the source keeps its network while a VM of the group is
    left there and drops it with the last one."""
    from labs.compute import moves, requests
    from labs.models import Operation

    [vm1] = approve(group_a, ines)
    run(vm1.operations.get())
    vm2 = requests.vm_create(group=group_a, by=ines)
    run(vm2.operations.get())
    h2 = make_host(
        "h2", tmp_path=tmp_path, ssh_port_min=30100, ssh_port_max=30109, group_networks=True
    )
    d1, d2 = driver_for(net_host), driver_for(h2)

    Vm.objects.filter(pk=vm1.pk).update(host=h2)  # the switch of vm1's move
    vm1 = Vm.objects.select_related("host", "group").get(pk=vm1.pk)
    moves._group_network_moved(vm1, net_host, d1, d2)
    assert _network_of(d2, group_a) == {"vm1", "vm2"}
    assert _network_of(d1, group_a) == {"vm1", "vm2"}  # vm2 is still there
    moves._group_network_moved(vm1, net_host, d1, d2)  # a retry changes nothing
    assert _network_of(d2, group_a) == _network_of(d1, group_a) == {"vm1", "vm2"}
    assert Operation.objects.filter(vm=vm2, kind="network_sync").exists()  # h1 is told

    Vm.objects.filter(pk=vm2.pk).update(host=h2)
    vm2 = Vm.objects.select_related("host", "group").get(pk=vm2.pk)
    moves._group_network_moved(vm2, net_host, d1, d2)
    assert _network_of(d1, group_a) is None  # nothing of the group is left on h1
    assert _network_of(d2, group_a) == {"vm1", "vm2"}


def test_the_end_of_terms_archive_takes_the_vm_off_the_group_network_and_frees_its_address(
    group_a, ines, template, net_host, settings, tmp_path, sent
):
    import subprocess

    from labs.choices import OperationKind
    from labs.compute import dispatch

    settings.STRATUS_ARCHIVE_DIR = str(tmp_path / "archive")
    [vm1] = approve(group_a, ines)
    run(vm1.operations.get())
    vm1.refresh_from_db()
    assert _network_of(driver_for(net_host), group_a) == {"vm1"}
    disk = tmp_path / "h1" / "vms" / f"{vm1.domain_name}.qcow2"  # a real disk to export
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)

    run(dispatch.operation_create(vm=vm1, kind=OperationKind.ARCHIVE, by=None))
    vm1.refresh_from_db()
    assert vm1.group_ip is None and vm1.group_mac  # the MAC stays for a restore
    assert _network_of(driver_for(net_host), group_a) is None
