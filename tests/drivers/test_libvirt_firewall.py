"""The group's firewall in the libvirt driver: the two nwfilters' XML (ElementTree) and
their definition, inner one first and under their own uuids, on libvirt's test driver
with nwfilter calls recorded (the test driver has none; the packets are
tests/integration/test_group_network.py's)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import xml.etree.ElementTree as ET

import libvirt
import pytest

from labs.drivers.base import FirewallOpening, GroupNetworkSpec, GroupNic, HypervisorError
from labs.drivers.libvirt.xml import firewall_filters_xml, group_nic_xml
from tests.drivers.test_libvirt import host  # noqa: F401 - fixture

SSH_GATEWAY = FirewallOpening(protocol="tcp", source="gateway", port_from=22, port_to=22)
PING_GROUP = FirewallOpening(protocol="icmp", source="group")
WEB_GROUP = FirewallOpening(protocol="tcp", source="group", port_from=8000, port_to=8099)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test made


def rules(element: ET.Element, direction: str) -> list[tuple[str, str, dict]]:
    found = [r for r in element.findall("rule") if r.get("direction") == direction]
    found.sort(key=lambda r: int(r.get("priority")))
    return [(r.get("action"), r[0].tag, r[0].attrib) for r in found]


def test_inbound_replies_pass_each_opening_lets_new_connections_in_the_rest_is_dropped():
    gateway, outer = (
        parse(x) for x in firewall_filters_xml("stratus-fw-g5", (WEB_GROUP, PING_GROUP))
    )
    assert outer.get("name") == "stratus-fw-g5" and outer.get("chain") == "root"
    assert [f.get("filter") for f in outer.findall("filterref")] == [
        "stratus-group",  # clean-traffic and the host closed, as before
        "stratus-fw-g5-gw",
    ]
    group = {"srcipaddr": "$GROUP_NET", "srcipmask": "24"}
    assert rules(outer, "in") == [
        ("accept", "all", {"state": "ESTABLISHED,RELATED"}),
        ("accept", "tcp", {"state": "NEW", **group, "dstportstart": "8000", "dstportend": "8099"}),
        ("accept", "icmp", {"state": "NEW", **group}),
        ("drop", "all", {"state": "NEW,ESTABLISHED,RELATED,INVALID"}),
    ]
    # Every iptables rule names its state: libvirt then adds no reverse rule of its own.
    assert all("state" in r[0].attrib for r in outer.findall("rule"))
    # No opening from the gateway: nothing to answer, only the chain's explicit end.
    [end] = gateway.findall("rule")
    assert (end.get("action"), end.get("priority"), end.find("ip").attrib) == (
        "return",
        "1000",
        {},
    )


def test_an_opening_from_the_gateway_lets_only_the_vms_answers_out_to_the_hosts():
    gateway, outer = (parse(x) for x in firewall_filters_xml("stratus-fw-g5", (SSH_GATEWAY,)))
    hosts = {"dstipaddr": "$GROUP_NET", "dstipmask": "28"}
    assert ("accept", "tcp", {"state": "NEW", "srcipaddr": "$GROUP_NET", "srcipmask": "28",
            "dstportstart": "22", "dstportend": "22"}) in rules(outer, "in")  # fmt: skip
    assert rules(outer, "out") == [
        ("accept", "udp", {"dstportstart": "67", "state": "NEW,ESTABLISHED", **hosts}),
        ("accept", "udp", {"dstportstart": "53", "state": "NEW,ESTABLISHED", **hosts}),
        ("accept", "tcp", {"dstportstart": "53", "state": "NEW,ESTABLISHED", **hosts}),
        (
            "accept",
            "tcp",
            {"state": "ESTABLISHED", **hosts, "srcportstart": "22", "srcportend": "22"},
        ),  # fmt: skip
        ("drop", "all", {"state": "NEW,ESTABLISHED,RELATED,INVALID", **hosts}),
    ]
    # Through the ebtables chain that drops the rest to the /28, before it (-680), after
    # clean-traffic's source check (-710).
    assert gateway.get("chain") == "ipv4-stxf" and -710 < int(gateway.get("priority")) < -680
    rule, end = gateway.findall("rule")
    assert (rule.get("action"), rule.get("direction")) == ("accept", "out")
    assert end.get("action") == "return"  # on to stratus-group's chain
    assert rule.find("ip").attrib == {**hosts, "protocol": "tcp", "srcportstart": "22",
                                      "srcportend": "22"}  # fmt: skip


def test_an_existing_firewall_filter_is_redefined_under_its_own_uuid():
    uuid = "0e0cbd5c-3ad0-4f55-9b3c-8a1a1c1d3e11"
    gateway, outer = (
        parse(x) for x in firewall_filters_xml("stratus-fw-g5", (), {"stratus-fw-g5": uuid})
    )
    assert outer.findtext("uuid") == uuid and gateway.find("uuid") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "gre", "source": "group"}, "tcp, udp or icmp"),
        ({"protocol": "icmp", "source": "world"}, "group or gateway"),
        ({"protocol": "icmp", "source": "group", "port_from": 1, "port_to": 1}, "no ports"),
        ({"protocol": "tcp", "source": "group", "port_from": 9, "port_to": 8}, "from <= to"),
        ({"protocol": "udp", "source": "group", "port_from": 0, "port_to": 8}, "1-65535"),
    ],
)
def test_a_bad_opening_is_refused_naming_the_problem(fields, message):
    with pytest.raises(HypervisorError, match=message):
        FirewallOpening(**fields)


def test_the_nic_references_the_groups_filter():
    nic = GroupNic(network="stx-g5", mac="52:54:01:00:00:01", ip="10.200.5.16",
                   subnet="10.200.5.0/24", filter="stratus-fw-g5")  # fmt: skip
    assert parse(group_nic_xml(nic)).find("filterref").get("filter") == "stratus-fw-g5"


class RecordingFilters:
    """The test driver's connection with the nwfilter calls a real host has."""

    def __init__(self, conn):
        self._conn, self.defined, self.undefined = conn, [], []
        self.uuids = {"stratus-fw-g5": "0e0cbd5c-3ad0-4f55-9b3c-8a1a1c1d3e11"}

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def nwfilterLookupByName(self, name):  # noqa: N802 - libvirt's name
        if name not in self.uuids and name not in {x for x, _ in self.defined}:
            error = libvirt.libvirtError("no filter")
            error.err = (libvirt.VIR_ERR_NO_NWFILTER, 0, "no filter", 0, "", "", "", 0, 0)
            raise error
        owner = self

        class Filter:
            def UUIDString(self):  # noqa: N802
                return owner.uuids.get(name, "5f2c4c8e-95a4-4bbc-8e8e-3b8c1a1d0a22")

            def undefine(self):
                owner.undefined.append(name)

        return Filter()

    def nwfilterDefineXML(self, xml):  # noqa: N802
        element = parse(xml)
        self.defined.append((element.get("name"), element.findtext("uuid")))


def test_the_driver_defines_the_inner_filter_first_and_removes_both_with_the_network(
    host, monkeypatch
):
    hv = host.hv
    recording = RecordingFilters(hv._conn)
    monkeypatch.setattr(type(hv), "_conn", property(lambda self: recording))
    spec = GroupNetworkSpec(name="stx-g5", bridge="stxg5", subnet="10.200.5.0/24",
                            gateway="10.200.5.1", firewall=(SSH_GATEWAY,))  # fmt: skip
    assert spec.firewall_filter == "stratus-fw-g5"
    assert hv.firewall_apply(spec) >= 0
    names = [name for name, _ in recording.defined]
    assert names[-2:] == ["stratus-fw-g5-gw", "stratus-fw-g5"]  # the referenced one first
    assert recording.defined[-1][1] == recording.uuids["stratus-fw-g5"]  # its own uuid
    hv.network_ensure(spec)
    hv.network_remove(spec)
    assert recording.undefined == ["stratus-fw-g5", "stratus-fw-g5-gw"]
