"""XML for libvirt, built with ElementTree (never by formatting strings), and parsing
libvirtd's own XML. The domain XML is the one place a VM's hardware is described."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from labs.drivers.base import (
    DESCRIPTION_MAX,
    NOT_XML,
    TITLE_MAX,
    FirewallOpening,
    GroupNetworkSpec,
    GroupNic,
    NetworkHost,
    PortSpec,
    ShareSpec,
    VmSpec,
    VolumeSpec,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
STRATUS_NS = "https://stratus.invalid/xmlns/libvirt/vm/1"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
SSH_GUEST_PORT = 22

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("stratus", STRATUS_NS)


def text(value: str, *, limit: int, one_line: bool = False) -> str:
    """Free text made safe for XML: no characters XML cannot carry, bounded length."""
    value = NOT_XML.sub("", value)
    if one_line:
        value = " ".join(value.split())
    return value[:limit]


def parse(xml: str) -> ET.Element:
    """Parse XML that libvirtd generated (live domain, pool, volume, capabilities)."""
    return ET.fromstring(xml)  # noqa: S314 - libvirtd's own output, not user input


def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def build_domain_xml(
    spec: VmSpec, *, overlay_path: str, seed_path: str, standalone: bool = False
) -> str:
    """The libvirt domain XML for ``spec``, built with ElementTree (never by formatting).

    Long on purpose: it is the one description of a VM's hardware, written top to bottom
    in the order the XML reads, so that a reviewer sees every device in one place.
    """
    domain = ET.Element("domain", type=spec.virt_type)
    sub(domain, "name", spec.name)
    sub(domain, "uuid", spec.uuid)
    title = text(spec.title, limit=TITLE_MAX, one_line=True)
    if title:  # libvirt's schema refuses an empty <title/>
        sub(domain, "title", title)
    description = text(spec.description, limit=DESCRIPTION_MAX)
    if description:
        sub(domain, "description", description)
    if spec.metadata:
        vm = sub(sub(domain, "metadata"), f"{{{STRATUS_NS}}}vm")
        for key, value in sorted(spec.metadata.items()):
            sub(vm, f"{{{STRATUS_NS}}}entry", text(value, limit=DESCRIPTION_MAX), key=key)
    sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    if spec.shares:
        # virtiofsd reads the guest's memory: it must be shared (memfd, no hugepages).
        backing = sub(domain, "memoryBacking")
        sub(backing, "source", type="memfd")
        sub(backing, "access", mode="shared")
    sub(domain, "vcpu", str(spec.vcpus), placement="static")

    os_el = sub(domain, "os")
    sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    sub(os_el, "boot", dev="hd")
    features = sub(domain, "features")
    sub(features, "acpi")  # ACPI shutdown
    sub(features, "apic")
    if spec.virt_type == "kvm":
        sub(domain, "cpu", mode="host-model")
    # TCG: no <cpu>, QEMU's default qemu64 model runs everywhere.
    sub(domain, "clock", offset="utc")
    sub(domain, "on_poweroff", "destroy")
    sub(domain, "on_reboot", "restart")
    sub(domain, "on_crash", "destroy")

    devices = sub(domain, "devices")
    disk = sub(devices, "disk", type="file", device="disk")
    sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    sub(disk, "source", file=overlay_path)
    # The backing chain spelled out, so libvirt neither probes it nor relabels the shared
    # base image: without relabel='no' it chowns the base to the QEMU user (and leaves it
    # so), letting any QEMU process make it writable. QEMU only needs to read it.
    # A restored archive (standalone) has no backing file: the chain ends at once.
    if standalone:
        sub(disk, "backingStore")
    else:
        backing = sub(disk, "backingStore", type="file")
        sub(backing, "format", type="qcow2")
        base_source = sub(backing, "source", file=spec.base_image)
        sub(base_source, "seclabel", model="dac", relabel="no")
        sub(backing, "backingStore")
    sub(disk, "target", dev="vda", bus="virtio")
    for index, volume in enumerate(spec.volumes):
        path = os.path.join(spec.storage_dir, volume.file_name)
        devices.append(volume_disk(volume, path=path, target=VOLUME_TARGETS[index]))

    for share in spec.shares:
        devices.append(share_filesystem(share))

    # The cloud kernel has no AHCI driver: the seed must be an IDE CD-ROM on the pc machine.
    cdrom = sub(devices, "disk", type="file", device="cdrom")
    sub(cdrom, "driver", name="qemu", type="raw")
    sub(cdrom, "source", file=seed_path)
    sub(cdrom, "target", dev="hdc", bus="ide")
    sub(cdrom, "readonly")

    sub(devices, "controller", type="usb", model="none")
    if spec.network == "bridge":
        interface = sub(devices, "interface", type="bridge")
        if spec.mac:
            sub(interface, "mac", address=spec.mac)
        sub(interface, "source", bridge=spec.bridge)
        sub(interface, "model", type="virtio")

    if spec.group_nic is not None:
        devices.append(group_nic(spec.group_nic))

    serial = sub(devices, "serial", type="pty")
    sub(serial, "target", port="0")
    console = sub(devices, "console", type="pty")
    sub(console, "target", type="serial", port="0")
    channel = sub(devices, "channel", type="unix")
    sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    # VNC on a unix socket of its own (QEMU offers no VNC authentication): libvirt makes
    # one per running domain (/var/lib/libvirt/qemu/domain-N-<name>/vnc.sock, read from
    # the live XML after every start), so no freed TCP port can ever lead a console to
    # another VM. force-shared: no client can make QEMU drop the other viewers.
    graphics = sub(devices, "graphics", type="vnc", sharePolicy="force-shared")
    sub(graphics, "listen", type="socket")
    video = sub(devices, "video")
    sub(video, "model", type="vga")  # plain VGA: a readable text console in noVNC
    sub(devices, "memballoon", model="virtio")
    rng = sub(devices, "rng", model="virtio")
    sub(rng, "backend", "/dev/urandom", model="random")

    if spec.network == "user":
        commandline = sub(domain, f"{{{QEMU_NS}}}commandline")
        for arg in _user_network_args(spec):
            sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(domain, encoding="unicode")


NETDEV_ID = "net0"
FORWARD_ADDRESS = "127.0.0.1"  # every forward listens on the host's loopback only


def netdev_value(ssh_port: int | None, ports: tuple[PortSpec, ...] = ()) -> str:
    """The ``-netdev`` argument: slirp with ``restrict=on``, SSH's forward, then each
    published port's, all on the loopback (``hostfwd=tcp:127.0.0.1:HOST-:GUEST``)."""
    netdev = f"user,id={NETDEV_ID},restrict=on"
    if ssh_port is not None:
        netdev += f",hostfwd=tcp:{FORWARD_ADDRESS}:{ssh_port}-:{SSH_GUEST_PORT}"
    for port in sorted(ports, key=lambda p: p.host_port):
        netdev += f",hostfwd=tcp:{FORWARD_ADDRESS}:{port.host_port}-:{port.guest_port}"
    return netdev


def netdev_arg(domain: ET.Element) -> ET.Element | None:
    """The ``<qemu:arg>`` holding a domain's user-mode ``-netdev`` value, or None (bridge
    mode, or a driver that keeps no QEMU command line: libvirt's test driver drops it)."""
    args = domain.findall(f"./{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")
    for flag, value in zip(args, args[1:], strict=False):
        if flag.get("value") == "-netdev" and (value.get("value") or "").startswith(
            f"user,id={NETDEV_ID},"
        ):
            return value
    return None


def netdev_forwards(value: str) -> dict[int, int]:
    """The TCP forwards of a ``-netdev`` value: {host port: guest port}."""
    forwards = {}
    for option in value.split(","):
        if not option.startswith(f"hostfwd=tcp:{FORWARD_ADDRESS}:"):
            continue
        host_part, _, guest_part = option.removeprefix("hostfwd=tcp:").partition("-")
        host_port, guest_port = host_part.rpartition(":")[2], guest_part.rpartition(":")[2]
        if host_port.isdigit() and guest_port.isdigit():
            forwards[int(host_port)] = int(guest_port)
    return forwards


def with_netdev(xml: str, value: str) -> str:
    """A domain's XML, or a snapshot's or a save image's (which hold one), forwarding
    what ``value`` says; unchanged when it has no user-mode ``-netdev``."""
    root = parse(xml)
    domain = root if root.tag == "domain" else root.find("domain")
    arg = netdev_arg(domain) if domain is not None else None
    if arg is None or arg.get("value") == value:
        return xml
    arg.set("value", value)
    return ET.tostring(root, encoding="unicode")


def _user_network_args(spec: VmSpec) -> list[str]:
    """QEMU slirp, cut off from everything but its forwards on the host's loopback: SSH's
    and the published ports'.

    libvirt's own user-mode interface has neither ``restrict`` nor port forwards (and
    passt is disabled on Debian 12), hence the QEMU namespace; libvirt then marks the
    domain "tainted: custom-argv", which is expected.
    """
    netdev = netdev_value(spec.ssh_port, spec.ports)
    device = "virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10"
    if spec.mac:
        device += f",mac={spec.mac}"
    return ["-netdev", netdev, "-device", device]


# Targets for data volumes: only hints, the guest names disks in the order it finds them
# (a vdc showed up as /dev/vdb); the serial is what identifies one.
VOLUME_TARGETS = tuple(f"vd{letter}" for letter in "bcdefghijklmnop")


def volume_disk(volume: VolumeSpec, *, path: str, target: str) -> ET.Element:
    """A block volume's <disk>: virtio, qcow2, its serial, and an explicit empty
    <backingStore/> so that libvirt never probes (and relabels) a chain a guest could have
    written into the image's header (LIBVIRT-NOTES, hostile uploads)."""
    disk = ET.Element("disk", type="file", device="disk")
    sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    sub(disk, "source", file=path)
    sub(disk, "backingStore")
    sub(disk, "target", dev=target, bus="virtio")
    sub(disk, "serial", volume.serial)
    return disk


def volume_disk_xml(volume: VolumeSpec, *, path: str, target: str) -> str:
    return ET.tostring(volume_disk(volume, path=path, target=target), encoding="unicode")


SHARE_ALIAS = "ua-share-"
SHARE_ALIAS_RO = "ua-share-ro-"


def share_filesystem(share: ShareSpec) -> ET.Element:
    """A shared directory's <filesystem>: virtiofs, uids passed through, found by its tag.
    The user alias says which share it is and, for the read-only one, that its source must
    be a read-only mount on the host before the domain starts (libvirt/shares.py)."""
    fs = ET.Element("filesystem", type="mount", accessmode="passthrough")
    sub(fs, "driver", type="virtiofs")
    sub(fs, "source", dir=share.source)
    sub(fs, "target", dir=share.tag)
    sub(fs, "alias", name=(SHARE_ALIAS_RO if share.readonly else SHARE_ALIAS) + share.tag)
    return fs


def volume_xml(name: str, *, capacity: int, fmt: str, backing: str | None = None) -> str:
    volume = ET.Element("volume")
    sub(volume, "name", name)
    sub(volume, "capacity", str(capacity), unit="bytes")
    sub(volume, "allocation", "0", unit="bytes")
    target = sub(volume, "target")
    sub(target, "format", type=fmt)
    if backing is not None:
        backing_el = sub(volume, "backingStore")
        sub(backing_el, "path", backing)
        sub(backing_el, "format", type="qcow2")
    return ET.tostring(volume, encoding="unicode")


def pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    sub(pool, "name", name)
    sub(sub(pool, "target"), "path", path)
    return ET.tostring(pool, encoding="unicode")


def snapshot_xml(name: str) -> str:
    snapshot = ET.Element("domainsnapshot")
    sub(snapshot, "name", name)
    return ET.tostring(snapshot, encoding="unicode")


# --- group networks (labs/compute/networks.py, docs/networking.md) -------------------

# The filter every group NIC references: clean-traffic (its own MAC and address only, no
# other L2 protocol) and GROUP_FILTER_IPV4 (the host answers DHCP and DNS, nothing else).
GROUP_FILTER = "stratus-group"
GROUP_FILTER_IPV4 = "stratus-group-ipv4"
# The first /28 of a group's /24 is the hosts' (one gateway address per host); VMs from .16.
RESERVED_PREFIX = 28
GROUP_NIC_PCI_SLOT = "0x11"  # beside the slirp NIC's 0x10, never auto-assigned


def network_xml(spec: GroupNetworkSpec) -> str:
    """An isolated libvirt network (no <forward>: nothing is routed or NATed out) with a
    static DHCP entry and a DNS entry per VM: dnsmasq gives no address to a MAC it does
    not know, and answers ``vm2`` with vm2's address."""
    network = ET.Element("network")
    sub(network, "name", spec.name)
    sub(network, "bridge", name=spec.bridge, stp="off", delay="0")
    sub(network, "mtu", size=str(spec.mtu))
    dns = sub(network, "dns", enable="yes")
    for host in spec.hosts:
        dns.append(dns_host(host))
    ip = sub(network, "ip", address=spec.gateway, netmask=spec.netmask)
    dhcp = sub(ip, "dhcp")
    for host in spec.hosts:
        dhcp.append(dhcp_host(host))
    return ET.tostring(network, encoding="unicode")


def dhcp_host(host: NetworkHost) -> ET.Element:
    return ET.Element("host", mac=host.mac, name=host.name, ip=host.ip)


def dns_host(host: NetworkHost) -> ET.Element:
    return _dns_host(ip=host.ip, name=host.name)


def _dns_host(*, ip: str, name: str) -> ET.Element:
    element = ET.Element("host", ip=ip)
    sub(element, "hostname", name)
    return element


def dhcp_host_xml(host: NetworkHost) -> str:
    return ET.tostring(dhcp_host(host), encoding="unicode")


def dns_host_xml(*, ip: str, name: str) -> str:
    return ET.tostring(_dns_host(ip=ip, name=name), encoding="unicode")


def network_hosts(xml: str) -> dict[str, set[NetworkHost]]:
    """The DHCP and DNS entries of a network's XML, as libvirt holds them."""
    root = parse(xml)
    dhcp = set()
    for host in root.findall("./ip/dhcp/host"):
        dhcp.add(NetworkHost(host.get("mac", ""), host.get("ip", ""), host.get("name", "")))
    dns = set()
    for host in root.findall("./dns/host"):
        for name in host.findall("hostname"):
            # DNS entries carry no MAC: compared by address and name only.
            dns.add((host.get("ip", ""), name.text or ""))
    return {"dhcp": dhcp, "dns": dns}


def group_nic(nic: GroupNic) -> ET.Element:
    """A VM's NIC on its group network, filtered (anti-spoofing, host closed)."""
    interface = ET.Element("interface", type="network")
    sub(interface, "mac", address=nic.mac)
    sub(interface, "source", network=nic.network)
    sub(interface, "model", type="virtio")
    filterref = sub(interface, "filterref", filter=nic.filter or GROUP_FILTER)
    sub(filterref, "parameter", name="IP", value=nic.ip)
    network = nic.subnet.split("/")[0]
    sub(filterref, "parameter", name="GROUP_NET", value=network)
    sub(interface, "address", type="pci", domain="0x0000", bus="0x00", slot=GROUP_NIC_PCI_SLOT)
    interface[-1].set("function", "0x0")
    return interface


def group_nic_xml(nic: GroupNic) -> str:
    return ET.tostring(group_nic(nic), encoding="unicode")


def _rule(parent: ET.Element, action: str, priority: int, **ip: str) -> None:
    rule = sub(parent, "rule", action=action, direction="out", priority=str(priority))
    sub(rule, "ip", **ip)


def group_filters_xml(uuids: dict[str, str] | None = None) -> list[str]:
    """The two nwfilters of group NICs, the inner one first (libvirt refuses a reference
    to a filter it does not know).

    The inner chain runs after clean-traffic's source checks (``ipv4-ip``, priority -710)
    and before its "accept every IPv4 frame the VM sends" (-650). From the VM it lets DHCP
    (to the broadcast address or a host address) and DNS (udp and tcp 53 to a host
    address) through, drops everything else to the hosts' reserved /28 and everything
    outside the group's /24 (the host's other addresses, whatever a route would reach).
    """
    inner = ET.Element("filter", name=GROUP_FILTER_IPV4, chain="ipv4-stxg", priority="-680")
    net, reserved = "$GROUP_NET", str(RESERVED_PREFIX)
    _rule(inner, "accept", 100, dstipaddr="255.255.255.255", protocol="udp", dstportstart="67")
    _rule(inner, "accept", 110, dstipaddr=net, dstipmask=reserved, protocol="udp",
          dstportstart="67")  # fmt: skip
    _rule(inner, "accept", 120, dstipaddr=net, dstipmask=reserved, protocol="udp",
          dstportstart="53")  # fmt: skip
    _rule(inner, "accept", 130, dstipaddr=net, dstipmask=reserved, protocol="tcp",
          dstportstart="53")  # fmt: skip
    _rule(inner, "drop", 140, dstipaddr=net, dstipmask=reserved)
    _rule(inner, "return", 150, dstipaddr=net, dstipmask="24")
    _rule(inner, "drop", 160)
    outer = ET.Element("filter", name=GROUP_FILTER, chain="root")
    sub(outer, "filterref", filter="clean-traffic")
    sub(outer, "filterref", filter=GROUP_FILTER_IPV4)
    for element in (inner, outer):
        # A filter that exists is redefined under its own uuid (libvirt refuses the name
        # with another): a changed rule reaches the running NICs.
        uuid = (uuids or {}).get(element.get("name", ""))
        if uuid:
            element.insert(0, ET.Element("uuid"))
            element[0].text = uuid
    return [ET.tostring(f, encoding="unicode") for f in (inner, outer)]


# --- the group's firewall (labs/compute/firewall.py, docs/networking.md "The firewall") ------

FIREWALL_GATEWAY_CHAIN = "ipv4-stxf"  # before ipv4-stxg (-680), after clean-traffic's -710
_STATES_ALL = "NEW,ESTABLISHED,RELATED,INVALID"


def _fw_rule(parent, action: str, direction: str, priority: int, proto: str, **attrs) -> None:
    rule = sub(parent, "rule", action=action, direction=direction, priority=str(priority))
    sub(rule, proto, **attrs)


def _source(opening: FirewallOpening) -> dict[str, str]:
    mask = str(RESERVED_PREFIX) if opening.source == "gateway" else "24"
    return {"srcipaddr": "$GROUP_NET", "srcipmask": mask}


def _ports(opening: FirewallOpening, side: str) -> dict[str, str]:
    if opening.protocol == "icmp":
        return {}
    return {f"{side}portstart": str(opening.port_from), f"{side}portend": str(opening.port_to)}


def firewall_filters_xml(
    name: str, openings: tuple[FirewallOpening, ...], uuids: dict[str, str] | None = None
) -> list[str]:
    """The two nwfilters of a group's firewall, the inner one first: ``name`` (what the
    group's NICs reference: ``stratus-group`` plus the inbound rules) and ``name-gw``.

    Inbound, at the iptables layer (the bridge's conntrack; every rule has an explicit
    ``state``, so libvirt puts it in the one chain of its direction and adds no reverse
    rule): replies (ESTABLISHED, RELATED) pass, each opening lets NEW connections in from
    its source, everything else to the VM is dropped. The hosts' own packets to a VM are
    not forwarded, so no inbound rule sees them (libvirt hooks FORWARD and INPUT only):
    an opening from the gateway is enforced on the VM's answers instead. ``name-gw`` lets
    them through the ebtables chain that drops everything else the VM sends to the
    reserved /28, and the iptables rules let them out only as replies (ESTABLISHED) to a
    connection the host opened, beside DHCP and DNS; anything else to the /28 is dropped.
    """
    gateway = ET.Element(
        "filter", name=f"{name}-gw", chain=FIREWALL_GATEWAY_CHAIN, priority="-690"
    )
    net, reserved = "$GROUP_NET", str(RESERVED_PREFIX)
    outer = ET.Element("filter", name=name, chain="root")
    sub(outer, "filterref", filter=GROUP_FILTER)
    sub(outer, "filterref", filter=f"{name}-gw")
    to_hosts = {"dstipaddr": net, "dstipmask": reserved}
    # What the VM sends to the hosts: DHCP and DNS, and replies the gateway's openings allow.
    _fw_rule(outer, "accept", "out", 100, "udp", dstportstart="67", state="NEW,ESTABLISHED",
             **to_hosts)  # fmt: skip
    _fw_rule(outer, "accept", "out", 101, "udp", dstportstart="53", state="NEW,ESTABLISHED",
             **to_hosts)  # fmt: skip
    _fw_rule(outer, "accept", "out", 102, "tcp", dstportstart="53", state="NEW,ESTABLISHED",
             **to_hosts)  # fmt: skip
    # Into the VM: replies to what it opened.
    _fw_rule(outer, "accept", "in", 200, "all", state="ESTABLISHED,RELATED")
    for index, opening in enumerate(openings):
        _fw_rule(outer, "accept", "in", 300 + index, opening.protocol, state="NEW",
                 **_source(opening), **_ports(opening, "dst"))  # fmt: skip
        if opening.source == "gateway":
            reply = {**to_hosts, **_ports(opening, "src")}
            _fw_rule(outer, "accept", "out", 110 + index, opening.protocol, state="ESTABLISHED",
                     **reply)  # fmt: skip
            ip = {"dstipaddr": net, "dstipmask": reserved, "protocol": opening.protocol}
            rule = sub(gateway, "rule", action="accept", direction="out",
                       priority=str(100 + index))  # fmt: skip
            sub(rule, "ip", **ip, **_ports(opening, "src"))
    # The chain's end, spelled out: with ebtables-nft a chain's RETURN policy acted as
    # ACCEPT (measured: every IPv4 frame skipped stratus-group's chain after this one).
    sub(sub(gateway, "rule", action="return", direction="out", priority="1000"), "ip")
    _fw_rule(outer, "drop", "out", 190, "all", state=_STATES_ALL, **to_hosts)
    _fw_rule(outer, "drop", "in", 900, "all", state=_STATES_ALL)
    for element in (gateway, outer):
        uuid = (uuids or {}).get(element.get("name", ""))
        if uuid:
            element.insert(0, ET.Element("uuid"))
            element[0].text = uuid
    return [ET.tostring(f, encoding="unicode") for f in (gateway, outer)]
