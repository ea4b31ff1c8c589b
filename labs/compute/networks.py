"""A private network per group (issue #12, docs/networking.md): who gets an address,
which hosts hold the group's network, and what each host's network must hold.

Allocation (database rows, under a lock on the group's network row):

- a group's subnet: the first free /24 of ``GROUP_NETWORK_POOL``, and its VNI (the first
  free from ``GROUP_NETWORK_VNI_BASE``), once per group;
- a host's address in it: the first free of .1-.14 (the reserved /28; DHCP and DNS are
  served there, nothing else of the host is reachable: the ``stratus-group`` nwfilter);
- a VM's MAC (random, 52:54:01 prefix, unique) and address (the first free from .16);
  a deleted VM's address is free again.

Only VMs on hosts with ``group_networks`` set get a group NIC (the demo's and the test
suite's own libvirtd have it off: no bridge is ever made in the machine's namespace), and
only while ``settings.GROUP_NETWORKS`` is on. Each host's network is made and changed by
that host's worker (the ``network_sync`` operation on one of its VMs), so a VXLAN device is
always made in the namespace of the libvirtd that owns its bridge.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets

from django.conf import settings
from django.db import IntegrityError, transaction

from labs.choices import ACTIVE_OPERATION_STATUSES, OperationKind
from labs.compute import dispatch, firewall
from labs.drivers.base import (
    GroupNetworkSpec,
    GroupNic,
    NetworkHost,
    TunnelPeer,
    TunnelSpec,
)
from labs.drivers.cloudinit import hostname_for
from labs.errors import Busy, Refused
from labs.models import Group, GroupNetwork, Host, Vm

log = logging.getLogger(__name__)

PREFIX = 24  # each group's subnet
RESERVED = 16  # .0-.15: the hosts' addresses (.1-.14); VMs from .16
MTU = 1450  # VXLAN over a 1500-byte IPv4 underlay (docs/networking.md)
MAC_PREFIX = "52:54:01"


def enabled_on(host: Host | None) -> bool:
    return bool(settings.GROUP_NETWORKS and host is not None and host.group_networks)


def _pool() -> ipaddress.IPv4Network:
    try:
        pool = ipaddress.IPv4Network(settings.GROUP_NETWORK_POOL)
    except ValueError as error:
        raise Refused(f"GROUP_NETWORK_POOL is not an IPv4 network: {error}") from None
    if pool.prefixlen > PREFIX:
        raise Refused(f"GROUP_NETWORK_POOL must be a /{PREFIX} or larger")
    return pool


def group_network_get(*, group: Group) -> GroupNetwork:
    """The group's network row, its subnet and VNI allocated on first use."""
    existing = GroupNetwork.objects.filter(group=group).first()
    if existing is not None:
        return existing
    for _attempt in range(5):
        try:
            with transaction.atomic():
                taken = set(GroupNetwork.objects.values_list("subnet", flat=True))
                subnet = next(
                    (str(s) for s in _pool().subnets(new_prefix=PREFIX) if str(s) not in taken),
                    None,
                )
                if subnet is None:
                    raise Refused(
                        f"no free /{PREFIX} left in GROUP_NETWORK_POOL "
                        f"({settings.GROUP_NETWORK_POOL}) for another group network"
                    )
                vnis = set(GroupNetwork.objects.values_list("vni", flat=True))
                vni = settings.GROUP_NETWORK_VNI_BASE
                while vni in vnis:
                    vni += 1
                network = GroupNetwork.objects.create(group=group, subnet=subnet, vni=vni)
                firewall.firewall_defaults_ensure(group=group)
                return network
        except IntegrityError:  # another group took it meanwhile, or this one's exists
            existing = GroupNetwork.objects.filter(group=group).first()
            if existing is not None:
                return existing
    raise Refused("could not allocate a group network; try again")


def _locked(group: Group) -> GroupNetwork:
    network = group_network_get(group=group)
    return GroupNetwork.objects.select_for_update().get(pk=network.pk)


def vm_network_join(*, vm: Vm) -> bool:
    """Give ``vm`` its MAC and address on its group's network if its host has group
    networks (kept when it has them). Whether it has a group NIC."""
    if not enabled_on(vm.host):
        return False
    if vm.group_ip and vm.group_mac:
        return True
    with transaction.atomic():
        network = _locked(vm.group)
        Vm.objects.select_for_update().filter(pk=vm.pk).first()
        row = Vm.objects.get(pk=vm.pk)
        if row.group_ip and row.group_mac:
            vm.group_ip, vm.group_mac = row.group_ip, row.group_mac
            return True
        subnet = ipaddress.IPv4Network(network.subnet)
        taken = set(
            Vm.objects.filter(group_ip__isnull=False, group=vm.group).values_list(
                "group_ip", flat=True
            )
        )
        address = next(
            (str(a) for a in list(subnet.hosts())[RESERVED - 1 :] if str(a) not in taken), None
        )
        if address is None:
            raise Refused(f"group {vm.group.name}'s network {network.subnet} is full")
        mac = row.group_mac or _free_mac()
        Vm.objects.filter(pk=vm.pk).update(group_ip=address, group_mac=mac)
        vm.group_ip, vm.group_mac = address, mac
    log.info("VM %s joins %s as %s (%s)", vm, network.subnet, vm.group_ip, vm.group_mac)
    return True


def _free_mac() -> str:
    while True:
        mac = MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
        if not Vm.objects.filter(group_mac=mac).exists():
            return mac


def vm_network_leave(*, vm: Vm) -> NetworkHost | None:
    """The deleted VM's address is free again; its entry (to take out of the hosts)."""
    entry = network_host(vm)
    Vm.objects.filter(pk=vm.pk).update(group_ip=None)
    vm.group_ip = None
    return entry


def network_host(vm: Vm) -> NetworkHost | None:
    if not (vm.group_ip and vm.group_mac):
        return None
    return NetworkHost(mac=vm.group_mac, ip=str(vm.group_ip), name=dns_name(vm))


def dns_name(vm: Vm) -> str:
    """The name other VMs of the group resolve: the VM's own name (``vm2``)."""
    return hostname_for(vm.name)


def _members(group: Group):
    """The group's live VMs that have a group NIC, with their hosts."""
    return (
        Vm.objects.live()
        .filter(group=group, group_ip__isnull=False, host__group_networks=True)
        .select_related("host")
        .order_by("group_ip", "pk")
    )


def group_vms(group: Group) -> list[Vm]:
    """The group's live VMs on its network (with their hosts)."""
    return list(_members(group))


def group_hosts(group: Group) -> list[Host]:
    hosts = {vm.host_id: vm.host for vm in _members(group)}
    return sorted(hosts.values(), key=lambda h: h.name)


def _gateway(network: GroupNetwork, host: Host) -> str:
    """``host``'s address in the group's subnet, allocated on first use."""
    key = str(host.pk)
    if key in network.gateways:
        return network.gateways[key]
    with transaction.atomic():
        network = GroupNetwork.objects.select_for_update().get(pk=network.pk)
        if key not in network.gateways:
            subnet = ipaddress.IPv4Network(network.subnet)
            used = set(network.gateways.values())
            free = [str(a) for a in list(subnet.hosts())[: RESERVED - 2] if str(a) not in used]
            if not free:
                raise Refused(f"the group network {network.subnet} spans too many hosts")
            network.gateways = {**network.gateways, key: free[0]}
            network.save(update_fields=["gateways"])
    return network.gateways[key]


def network_spec(*, group: Group, host: Host, leaving: Vm | None = None) -> GroupNetworkSpec:
    """What the group's network on ``host`` must hold: every VM of the group (wherever
    it runs) but ``leaving``, and a tunnel to the group's other hosts."""
    network = group_network_get(group=group)
    members = [vm for vm in _members(group) if leaving is None or vm.pk != leaving.pk]
    entries = tuple(e for e in (network_host(vm) for vm in members) if e is not None)
    tunnel = None
    if host.tunnel_address:
        peers = sorted(
            {
                TunnelPeer(address=vm.host.tunnel_address, port=vm.host.vxlan_port)
                for vm in members
                if vm.host_id != host.pk and vm.host.tunnel_address
            },
            key=lambda p: (p.address, p.port),
        )
        tunnel = TunnelSpec(
            vni=network.vni,
            local=host.tunnel_address,
            port=host.vxlan_port,
            netns=host.netns,
            peers=tuple(peers),
        )
    return GroupNetworkSpec(
        name=network.libvirt_name,
        bridge=network.bridge,
        subnet=network.subnet,
        gateway=_gateway(network, host),
        hosts=entries,
        mtu=MTU,
        tunnel=tunnel,
        firewall=firewall.openings(group=group),
    )


def nic_spec(vm: Vm) -> GroupNic | None:
    """The VM's group NIC for its domain XML (None: its host has no group networks)."""
    if not (enabled_on(vm.host) and vm.group_ip and vm.group_mac):
        return None
    network = group_network_get(group=vm.group)
    return GroupNic(
        network=network.libvirt_name,
        mac=vm.group_mac,
        ip=str(vm.group_ip),
        subnet=network.subnet,
        filter=firewall_filter(group=vm.group),
    )


def firewall_filter(*, group: Group) -> str:
    """The nwfilter of the group's firewall, which its NICs reference (it includes
    ``stratus-group``): ``stratus-fw-g<group id>``."""
    return f"stratus-fw-g{group.pk}"


def peers_sync(*, vm: Vm) -> list[int]:
    """Ask each other host of ``vm``'s group to bring its network up to date (a VM was
    added or removed, a host joined or left): a ``network_sync`` operation on one idle VM
    there. A host whose VMs are all busy is left: their operation (a provision, a start)
    brings the network up to date itself. The operations' ids."""
    sent = []
    for host in group_hosts(vm.group):
        if host.pk == vm.host_id:
            continue
        candidates = (
            _members(vm.group)
            .filter(host=host)
            .exclude(operations__status__in=ACTIVE_OPERATION_STATUSES)
        )
        target = candidates.first()
        if target is None:
            log.info("group %s: every VM on %s is busy; its own operation syncs", vm.group, host)
            continue
        try:
            op = dispatch.operation_create(vm=target, kind=OperationKind.NETWORK_SYNC, by=None)
        except Busy:  # it took an operation meanwhile, which brings the network up to date
            continue
        sent.append(op.pk)
    return sent
