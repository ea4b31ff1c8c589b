"""Group networks in the libvirt driver: the network, NIC and nwfilter XML (ElementTree),
the specs' checks, and a network made, changed live and removed on libvirt's test driver
(nwfilters and VXLAN need a real host: tests/integration/test_group_network.py)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import xml.etree.ElementTree as ET

import pytest

from labs.drivers.base import GroupNetworkSpec, GroupNic, HypervisorError, NetworkHost
from labs.drivers.libvirt.xml import (
    build_domain_xml,
    group_filters_xml,
    group_nic_xml,
    network_hosts,
    network_xml,
)
from tests.drivers.test_libvirt import host, make_spec  # noqa: F401 - fixtures

VM1 = NetworkHost(mac="52:54:01:00:00:01", ip="10.200.5.16", name="vm1")
VM2 = NetworkHost(mac="52:54:01:00:00:02", ip="10.200.5.17", name="vm2")
NIC = GroupNic(network="stx-g5", mac=VM1.mac, ip=VM1.ip, subnet="10.200.5.0/24")


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test or libvirt's test driver made


def spec(**over) -> GroupNetworkSpec:
    values = {
        "name": "stx-g5",
        "bridge": "stxg5",
        "subnet": "10.200.5.0/24",
        "gateway": "10.200.5.1",
        "hosts": (VM1,),
    }
    return GroupNetworkSpec(**{**values, **over})


def test_the_network_is_isolated_with_static_dhcp_and_dns_entries_only():
    root = parse(network_xml(spec(hosts=(VM1, VM2))))
    assert root.find("forward") is None  # nothing routed or NATed out
    assert root.find("bridge").attrib == {"name": "stxg5", "stp": "off", "delay": "0"}
    assert root.find("mtu").get("size") == "1450"
    ip = root.find("ip")
    assert ip.attrib == {"address": "10.200.5.1", "netmask": "255.255.255.0"}
    assert ip.find("dhcp/range") is None  # no address for a MAC it does not know
    assert [h.attrib for h in ip.findall("dhcp/host")] == [
        {"mac": VM1.mac, "name": "vm1", "ip": VM1.ip},
        {"mac": VM2.mac, "name": "vm2", "ip": VM2.ip},
    ]
    assert [(h.get("ip"), h.findtext("hostname")) for h in root.findall("dns/host")] == [
        (VM1.ip, "vm1"),
        (VM2.ip, "vm2"),
    ]


def test_the_group_nic_is_virtio_on_the_network_with_the_anti_spoofing_filter():
    nic = parse(group_nic_xml(NIC))
    assert nic.get("type") == "network"
    assert nic.find("source").get("network") == "stx-g5"
    assert nic.find("mac").get("address") == VM1.mac
    assert nic.find("model").get("type") == "virtio"
    filterref = nic.find("filterref")
    assert filterref.get("filter") == "stratus-group"
    params = {p.get("name"): p.get("value") for p in filterref.findall("parameter")}
    assert params == {"IP": VM1.ip, "GROUP_NET": "10.200.5.0"}
    assert nic.find("address").get("slot") == "0x11"  # never the slirp NIC's 0x10


def test_a_domain_with_a_group_nic_keeps_its_slirp_nic(make_spec):
    root = parse(build_domain_xml(make_spec(group_nic=NIC), overlay_path="/o", seed_path="/s"))
    [nic] = root.findall("devices/interface")
    assert nic.find("filterref").get("filter") == "stratus-group"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert any(a.startswith("user,id=net0,restrict=on") for a in args)


def test_the_filters_include_clean_traffic_and_close_the_host_but_dhcp_and_dns():
    inner, outer = (parse(x) for x in group_filters_xml())
    assert outer.get("name") == "stratus-group" and outer.get("chain") == "root"
    assert [f.get("filter") for f in outer.findall("filterref")] == [
        "clean-traffic",
        "stratus-group-ipv4",
    ]
    # Between clean-traffic's source check (ipv4-ip, -710) and its IPv4 accept (-650).
    assert inner.get("chain") == "ipv4-stxg" and -710 < int(inner.get("priority")) < -650
    rules = [(r.get("action"), r.find("ip").attrib) for r in inner.findall("rule")]
    assert all(r.get("direction") == "out" for r in inner.findall("rule"))
    net = {"dstipaddr": "$GROUP_NET", "dstipmask": "28"}
    assert rules == [
        ("accept", {"dstipaddr": "255.255.255.255", "protocol": "udp", "dstportstart": "67"}),
        ("accept", {**net, "protocol": "udp", "dstportstart": "67"}),
        ("accept", {**net, "protocol": "udp", "dstportstart": "53"}),
        ("accept", {**net, "protocol": "tcp", "dstportstart": "53"}),
        ("drop", net),
        ("return", {"dstipaddr": "$GROUP_NET", "dstipmask": "24"}),
        ("drop", {}),
    ]


def test_an_existing_filter_is_redefined_under_its_own_uuid():
    uuid = "7afca9a8-2e28-4419-ae98-1081887a0753"
    inner, outer = (parse(x) for x in group_filters_xml({"stratus-group-ipv4": uuid}))
    assert inner.findtext("uuid") == uuid and outer.find("uuid") is None


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"name": "default"}, "stx-g<number>"),
        ({"bridge": "eth0"}, "stxg<number>"),
        ({"subnet": "10.200.5.0/33"}, "IPv4 network"),
        ({"gateway": "10.201.0.1"}, "gateway must be an address of the subnet"),
        ({"hosts": (NetworkHost("52:54:01:00:00:09", "10.9.9.9", "vm9"),)}, "not in the subnet"),
        ({"mtu": 100}, "MTU"),
    ],
)
def test_a_bad_network_spec_is_refused_naming_the_problem(over, message):
    with pytest.raises(HypervisorError, match=message):
        spec(**over)


def test_a_bad_host_entry_is_refused():
    with pytest.raises(HypervisorError, match="DNS label"):
        NetworkHost(mac=VM1.mac, ip=VM1.ip, name="vm 1; rm")


def test_a_network_is_made_changed_live_and_removed_on_the_test_driver(host):
    hv = host.hv
    hv.network_ensure(spec())
    net = host.conn.networkLookupByName("stx-g5")
    assert net.isActive() and net.autostart()
    hv.network_ensure(spec(hosts=(VM1, VM2)))
    held = network_hosts(net.XMLDesc(0))
    assert held["dhcp"] == {VM1, VM2} and held["dns"] == {(VM1.ip, "vm1"), (VM2.ip, "vm2")}
    hv.network_host_remove(spec(hosts=(VM1, VM2)), VM1)
    held = network_hosts(net.XMLDesc(0))
    assert held["dhcp"] == {VM2} and held["dns"] == {(VM2.ip, "vm2")}
    moved = NetworkHost(mac=VM2.mac, ip="10.200.5.20", name="vm2")
    hv.network_ensure(spec(hosts=(moved,)))  # a stale entry with the same MAC goes first
    assert network_hosts(net.XMLDesc(0))["dhcp"] == {moved}
    hv.network_remove(spec())
    assert hv.network_names() == []
