"""Published ports in the libvirt driver: the domain XML's forwards (built from the spec,
rewritten in a domain's, a snapshot's or a move's XML), what QEMU's ``info usernet`` says,
and how a running QEMU is brought to the wanted forwards through its monitor (the monitor
is recorded here: libvirt's test driver has none, and drops the QEMU command line; the
real QEMU is tests/integration/test_one_guest.py)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from labs.drivers.base import HypervisorError, PortSpec
from labs.drivers.libvirt import migration
from labs.drivers.libvirt import ports as libvirt_ports
from labs.drivers.libvirt.xml import build_domain_xml, netdev_value, parse, with_netdev
from tests.drivers.test_libvirt import QEMU, host, make_spec  # noqa: F401 - fixtures

WEB = PortSpec(host_port=23001, guest_port=80)
APP = PortSpec(host_port=23000, guest_port=8080)

# QEMU 7.2's `info usernet` of a guest with SSH's forward, two published ones and a client
# connected to the first (the established connection is not a forward).
USERNET = """\
Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[ESTABLISHED]   27       10.0.2.15    80       10.0.2.2  41234     0     0
  TCP[HOST_FORWARD]  19       127.0.0.1 23001       10.0.2.15    80     0     0
  TCP[HOST_FORWARD]  18       127.0.0.1 23000       10.0.2.15  8080     0     0
  TCP[HOST_FORWARD]  13       127.0.0.1 22001       10.0.2.15    22     0     0
"""


def netdev_of(xml: str) -> str:
    root = ET.fromstring(xml)  # noqa: S314 - XML this test made
    domain = root if root.tag == "domain" else root.find("domain")
    args = [a.get("value") for a in domain.findall(f"{QEMU}commandline/{QEMU}arg")]
    return args[args.index("-netdev") + 1]


def test_published_ports_are_more_forwards_on_the_loopback_beside_sshs(make_spec):
    xml = build_domain_xml(make_spec(ports=(WEB, APP)), overlay_path="/o", seed_path="/s")
    assert netdev_of(xml) == (
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:22001-:22,"
        "hostfwd=tcp:127.0.0.1:23000-:8080,hostfwd=tcp:127.0.0.1:23001-:80"
    )
    assert "0.0.0.0" not in xml  # noqa: S104 - asserting it is absent


@pytest.mark.parametrize(
    ("ports", "network", "message"),
    [
        ((WEB, replace(APP, host_port=23001)), "user", "a host port of its own"),
        ((replace(WEB, host_port=22001),), "user", "not SSH's"),
        ((WEB, replace(APP, guest_port=80)), "user", "a guest port is published once"),
        ((WEB,), "bridge", "published ports need user-mode networking"),
    ],
)
def test_a_spec_with_clashing_ports_is_refused(make_spec, ports, network, message):
    extra = {"bridge": "br0"} if network == "bridge" else {}
    with pytest.raises(HypervisorError, match=message):
        make_spec(ports=ports, network=network, **extra)


@pytest.mark.parametrize(("host_port", "guest_port"), [(80, 80), (70000, 80), (23000, 0)])
def test_a_port_out_of_range_is_refused(host_port, guest_port):
    with pytest.raises(HypervisorError, match="invalid"):
        PortSpec(host_port=host_port, guest_port=guest_port)


def snapshot_of(domain_xml: str, name: str | None = None) -> str:
    """A snapshot's XML holding this domain, built with ElementTree as libvirt would."""
    snapshot = ET.Element("domainsnapshot")
    if name is not None:
        ET.SubElement(snapshot, "name").text = name
    snapshot.append(parse(domain_xml))
    return ET.tostring(snapshot, encoding="unicode")


def test_a_domains_or_a_snapshots_xml_gets_the_forwards_of_now(make_spec):
    then = build_domain_xml(make_spec(ports=(WEB,)), overlay_path="/o", seed_path="/s")
    now = netdev_value(22001, (APP,))
    assert netdev_of(with_netdev(then, now)) == now
    snapshot = snapshot_of(then, "s1")
    rewritten = with_netdev(snapshot, now)
    assert netdev_of(rewritten) == now
    assert libvirt_ports.forwards_of(rewritten) == {22001: 22, 23000: 8080}
    assert with_netdev(rewritten, now) == rewritten  # nothing to change: unchanged


def test_a_moves_xml_forwards_the_destinations_ports_and_names_its_storage(make_spec):
    source = make_spec(ports=(WEB,))
    target = replace(source, ssh_port=24100, ports=(PortSpec(24180, 80),), storage_dir="/dst")
    # A running domain's own XML lacks a port published live: the target's spec decides.
    overlay = f"{source.storage_dir}/{source.overlay_name}"
    live = build_domain_xml(replace(source, ports=()), overlay_path=overlay, seed_path="/s")
    moved = migration._as_on_destination(live, source, target)
    assert libvirt_ports.forwards_of(moved) == {24100: 22, 24180: 80}
    assert f"/dst/{source.overlay_name}" in moved and source.storage_dir not in moved


def test_info_usernet_gives_the_forwards_and_not_the_connections():
    assert libvirt_ports.usernet_forwards(USERNET) == {23001: 80, 23000: 8080, 22001: 22}
    assert libvirt_ports.usernet_forwards("") == {}


class Monitor:
    """A running QEMU's monitor as the driver sees it: forwards, and the commands sent."""

    def __init__(self, forwards: dict[int, int], refuse: str = ""):
        self.forwards, self.refuse, self.sent = dict(forwards), refuse, []

    def __call__(self, dom, command: str) -> str:
        self.sent.append(command)
        words = command.split()
        if words[0] == "info":
            return "".join(
                f"  TCP[HOST_FORWARD]  9  127.0.0.1 {h}  10.0.2.15 {g}  0  0\n"
                for h, g in self.forwards.items()
            )
        rule = words[2].removeprefix("tcp:127.0.0.1:")
        if words[0] == "hostfwd_remove":
            self.forwards.pop(int(rule))
            return ""
        if self.refuse:
            return self.refuse
        host_port, guest_port = rule.split("-:")
        self.forwards[int(host_port)] = int(guest_port)
        return ""


def test_a_running_qemu_gets_the_missing_forwards_and_loses_the_stale_ones(host, monkeypatch):
    monitor = Monitor({22001: 22, 23002: 443, 23001: 80})
    monkeypatch.setattr(libvirt_ports, "hmp", monitor)
    host.hv._forwards_live(None, "stratus-vm-1", ssh_port=22001, ports=(WEB, APP))
    assert monitor.forwards == {22001: 22, 23001: 80, 23000: 8080}
    changes = [c for c in monitor.sent if not c.startswith("info")]
    assert changes == [
        "hostfwd_remove net0 tcp:127.0.0.1:23002",
        "hostfwd_add net0 tcp:127.0.0.1:23000-:8080",
    ]


def test_a_forward_qemu_cannot_set_up_is_a_clear_error(host, monkeypatch):
    said = "Could not set up host forwarding rule 'tcp:127.0.0.1:23000-:8080'"
    monkeypatch.setattr(libvirt_ports, "hmp", Monitor({22001: 22}, refuse=said))
    with pytest.raises(HypervisorError, match="could not forward port 23000 to guest port 8080"):
        host.hv._forwards_live(None, "stratus-vm-1", ssh_port=22001, ports=(APP,))


def test_a_domain_without_qemus_command_line_publishes_nothing(host, make_spec):
    """libvirt's test driver drops <qemu:commandline>, as a bridged domain has none."""
    spec = make_spec()
    from tests.drivers.test_libvirt import seed

    host.hv.provision(spec, seed_iso=seed())
    with pytest.raises(HypervisorError, match="no user-mode network"):
        host.hv.ports_apply(spec.name, ssh_port=spec.ssh_port, ports=(WEB,))


class Domain:
    """A domain as the rewrite before a revert or after a managed save sees it."""

    def __init__(self, definition: str, saved: str = ""):
        self.definition, self.saved, self.redefined, self.saved_as = definition, saved, [], None

    def XMLDesc(self, flags):  # noqa: N802 - libvirt's name
        return self.definition

    def name(self):
        return "stratus-vm-1"

    def snapshotCreateXML(self, xml, flags):  # noqa: N802
        self.redefined.append((xml, flags))

    def managedSaveGetXMLDesc(self, flags):  # noqa: N802
        return self.saved

    def managedSaveDefineXML(self, xml, flags):  # noqa: N802
        self.saved_as = xml


class Snap:
    def __init__(self, xml: str, current: bool):
        self.xml, self.current = xml, current

    def getXMLDesc(self, flags):  # noqa: N802
        return self.xml

    def isCurrent(self, flags):  # noqa: N802
        return self.current

    def getName(self):  # noqa: N802
        return "s1"


def test_a_revert_first_gives_the_snapshot_the_forwards_of_now(host, make_spec):
    import libvirt

    now = build_domain_xml(make_spec(ports=(APP,)), overlay_path="/o", seed_path="/s")
    then = build_domain_xml(make_spec(ports=(WEB,)), overlay_path="/o", seed_path="/s")
    dom = Domain(now)
    host.hv.snapshot_forwards_match(dom, Snap(snapshot_of(then), True))
    [(xml, flags)] = dom.redefined
    assert libvirt_ports.forwards_of(xml) == {22001: 22, 23000: 8080}
    assert flags == (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    )
    dom.redefined.clear()
    host.hv.snapshot_forwards_match(dom, Snap(snapshot_of(now), False))
    assert dom.redefined == []  # the same forwards: left alone


def test_a_managed_save_image_gets_the_forwards_published_while_it_ran(host, make_spec):
    now = build_domain_xml(make_spec(ports=(APP,)), overlay_path="/o", seed_path="/s")
    started_with = build_domain_xml(make_spec(), overlay_path="/o", seed_path="/s")
    dom = Domain(now, saved=started_with)
    host.hv.saved_forwards_match(dom)
    assert libvirt_ports.forwards_of(dom.saved_as) == {22001: 22, 23000: 8080}
