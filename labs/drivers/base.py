"""What the runner needs from a hypervisor: the ``Driver`` protocol and its plain types.

A driver is chosen per host by ``Host.driver`` (``labs.drivers.registry``); callers pass
plain dataclasses (:class:`VmSpec`) and get plain values back (:class:`DomainState`,
:class:`ConsoleEndpoint`), never a hypervisor library's objects. Every method blocks (it
runs in Celery workers, never on an event loop) and raises one of three errors:

- :class:`HypervisorUnavailable`: transient, retry later (the host did not answer, the
  connection dropped, a lock or the guest agent timed out);
- :class:`DomainMissing`: the VM does not exist on the host (or, for a console, is not
  running);
- :class:`HypervisorError`: anything else, permanent (bad input, a missing base image...).

Operations are idempotent where that makes sense: a retried ``provision`` finds what exists
and finishes the rest; starting a running VM, stopping a stopped one or deleting something
already gone is a no-op. The libvirt driver (``labs.drivers.libvirt``) is the one there is.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Stratus only ever looks at, lists or touches domains whose name starts with this.
DOMAIN_PREFIX = "stratus-"
Progress = Callable[[str], object]

# The states a driver reports for a domain (``DomainState.state``, ``Driver.state``).
STATES = ("nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed")
STATES += ("suspended",)


# --- errors --------------------------------------------------------------------------------


class HypervisorError(Exception):
    """A hypervisor operation failed and retrying will not help."""


class HypervisorUnavailable(HypervisorError):
    """The host did not answer or was busy; the same call may succeed later."""


class DomainMissing(HypervisorError):
    """The VM does not exist on the host (or, for a console, is not running)."""


# --- specs ---------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9-]{1,55}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_META_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# Characters XML 1.0 cannot carry at all, even escaped.
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
TITLE_MAX, DESCRIPTION_MAX, SNAPSHOT_NAME_MAX = 200, 10_000, 64
VIRT_TYPES = ("qemu", "kvm")
MAX_VOLUMES = 8  # data disks per VM: vdb to vdi
NETWORK_MODES = ("user", "bridge")


_VOLUME_FILE_RE = re.compile(r"[a-z0-9-]{1,80}\.qcow2")
_SERIAL_RE = re.compile(r"[A-Za-z0-9-]{1,20}")  # virtio-blk: 20 bytes at most


@dataclass(frozen=True)
class VolumeSpec:
    """A block volume: a standalone qcow2 (no backing file) in the host's storage
    directory, seen by the guest as ``/dev/disk/by-id/virtio-<serial>``."""

    file_name: str  # "<prefix>volume-<id>.qcow2", from the row's id
    serial: str
    size_gib: int

    def __post_init__(self) -> None:
        problems = []
        name = self.file_name
        if not (name.startswith(DOMAIN_PREFIX) and _VOLUME_FILE_RE.fullmatch(name)):
            problems.append(f"the file name must be {DOMAIN_PREFIX!r}..., a-z, 0-9, '-', .qcow2")
        if not _SERIAL_RE.fullmatch(self.serial or ""):
            problems.append("the serial must be 1-20 of A-Z, a-z, 0-9 and '-'")
        if not 1 <= self.size_gib <= 16 * 1024:
            problems.append("the size must be between 1 GiB and 16 TiB")
        if problems:
            raise HypervisorError(f"invalid volume {self.file_name!r}: " + "; ".join(problems))


_SHARE_TAG_RE = re.compile(r"[a-z][a-z0-9-]{0,35}")
MAX_SHARES = 4


@dataclass(frozen=True)
class ShareSpec:
    """A host directory exported to the guest with virtiofs, mounted there by its tag
    (labs/compute/shares.py). ``readonly``: ``source`` is a read-only bind mount of its
    sibling ``files`` directory, made on the host before the domain starts (libvirt 9.0
    refuses virtiofs ``<readonly/>``; see labs/drivers/libvirt/shares.py)."""

    tag: str  # the virtiofs tag the guest mounts ("group", "course")
    source: str  # absolute host directory
    guest_path: str  # where the guest mounts it (/srv/group)
    readonly: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not _SHARE_TAG_RE.fullmatch(self.tag or ""):
            problems.append("the tag must be a-z, 0-9 and '-', starting with a letter")
        for what, path in (("source", self.source), ("guest path", self.guest_path)):
            plain = os.path.isabs(path or "") and os.path.normpath(path) == path
            if not plain or NOT_XML.search(path):
                problems.append(f"the {what} must be a normalised absolute path")
        if problems:
            raise HypervisorError(f"invalid share {self.tag!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class PortSpec:
    """A published port: TCP ``host_port`` on the host's loopback forwarded to the guest's
    ``guest_port`` (user-mode networking: one more slirp hostfwd beside SSH's)."""

    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        if not (isinstance(self.host_port, int) and 1024 <= self.host_port <= 65535):
            raise HypervisorError(f"invalid published port {self.host_port!r}: 1024-65535")
        if not (isinstance(self.guest_port, int) and 1 <= self.guest_port <= 65535):
            raise HypervisorError(f"invalid guest port {self.guest_port!r}: 1-65535")


_NET_NAME_RE = re.compile(r"stx-g[0-9]{1,11}")
_NET_BRIDGE_RE = re.compile(r"stxg[0-9]{1,11}")
_HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _ipv4(value: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class NetworkHost:
    """One VM on a group network: the group's DHCP gives ``mac`` the address ``ip`` and
    its DNS answers ``name`` (the VM's name, e.g. ``vm2``) with it."""

    mac: str
    ip: str
    name: str

    def __post_init__(self) -> None:
        problems = []
        if not _MAC_RE.fullmatch(self.mac or ""):
            problems.append("the MAC address must look like 52:54:00:12:34:56 (lower case)")
        if _ipv4(self.ip) is None:
            problems.append("the address must be IPv4")
        if not _HOSTNAME_RE.fullmatch(self.name or ""):
            problems.append("the name must be a DNS label (a-z, 0-9, '-')")
        if problems:
            raise HypervisorError(f"invalid network host {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class FirewallOpening:
    """One inbound opening of a group's firewall (labs/compute/firewall.py): ``protocol``
    tcp, udp (``port_from``-``port_to``) or icmp (no ports), from ``source`` "group" (the
    group's /24) or "gateway" (the hosts' reserved /28)."""

    protocol: str
    source: str
    port_from: int | None = None
    port_to: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.protocol not in ("tcp", "udp", "icmp"):
            problems.append("the protocol must be tcp, udp or icmp")
        if self.source not in ("group", "gateway"):
            problems.append("the source must be group or gateway")
        if self.protocol == "icmp":
            if self.port_from is not None or self.port_to is not None:
                problems.append("an icmp opening has no ports")
        elif not (
            isinstance(self.port_from, int)
            and isinstance(self.port_to, int)
            and 1 <= self.port_from <= self.port_to <= 65535
        ):
            problems.append("the ports must be 1-65535, from <= to")
        if problems:
            raise HypervisorError(f"invalid firewall opening {self!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class TunnelPeer:
    address: str  # its underlay address
    port: int  # its VXLAN UDP port


@dataclass(frozen=True)
class TunnelSpec:
    """The group's VXLAN device on one host: VNI, this host's underlay address and UDP
    port, the network namespace its libvirtd runs in ("": the worker's own) and the
    group's other hosts (head-end replication: one all-zero FDB entry per peer)."""

    vni: int
    local: str
    port: int
    netns: str = ""
    peers: tuple[TunnelPeer, ...] = ()


@dataclass(frozen=True)
class GroupNetworkSpec:
    """A group's private network on one host: an isolated libvirt network (no
    <forward>), its bridge, this host's address in the subnet (DHCP and DNS are served
    there and nothing else of the host: the ``stratus-group`` nwfilter), a static DHCP and
    DNS entry per VM, and a VXLAN tunnel to the group's other hosts when it spans some."""

    name: str  # "stx-g<group id>"
    bridge: str  # "stxg<group id>"
    subnet: str  # "10.200.3.0/24"
    gateway: str  # this host's address in the subnet's reserved first /28
    hosts: tuple[NetworkHost, ...] = ()
    mtu: int = 1450
    tunnel: TunnelSpec | None = None
    # The group's firewall (its inbound openings); None: the NICs have no firewall of
    # their own (``stratus-group`` only, as before the firewall).
    firewall: tuple[FirewallOpening, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not _NET_NAME_RE.fullmatch(self.name or ""):
            problems.append("the name must be stx-g<number>")
        if not _NET_BRIDGE_RE.fullmatch(self.bridge or ""):
            problems.append("the bridge must be stxg<number>")
        try:
            subnet = ipaddress.IPv4Network(self.subnet)
        except (ValueError, TypeError):
            subnet = None
            problems.append("the subnet must be an IPv4 network such as 10.200.3.0/24")
        gateway = _ipv4(self.gateway)
        if subnet is not None and (gateway is None or gateway not in subnet):
            problems.append("the gateway must be an address of the subnet")
        if subnet is not None:
            for host in self.hosts:
                if ipaddress.IPv4Address(host.ip) not in subnet:
                    problems.append(f"{host.name}'s address {host.ip} is not in the subnet")
        if not 576 <= self.mtu <= 9000:
            problems.append("the MTU must be between 576 and 9000")
        if problems:
            raise HypervisorError(f"invalid group network {self.name!r}: " + "; ".join(problems))

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).netmask)

    @property
    def firewall_filter(self) -> str:
        """The nwfilter of the group's firewall: ``stratus-fw-g<group id>``."""
        return "stratus-fw-g" + self.name.removeprefix("stx-g")


@dataclass(frozen=True)
class GroupNic:
    """A VM's NIC on its group network: virtio, its MAC, filtered by ``stratus-group``
    (clean-traffic: only its own MAC and ``ip``; the host reachable for DHCP/DNS only)."""

    network: str  # the libvirt network's name
    mac: str
    ip: str
    subnet: str  # the group's subnet (the filter's parameters)
    filter: str = "stratus-group"  # the group's firewall filter (stratus-fw-g<id>) when set


@dataclass(frozen=True)
class VmSpec:
    """Everything the hypervisor needs to build one VM. Validated on construction."""

    name: str  # domain name: "stratus-" + [a-z0-9-], e.g. "stratus-vm-12"
    uuid: str  # chosen by the caller; define is idempotent by uuid
    title: str  # free text, goes in <title> (one line, cut to TITLE_MAX)
    description: str  # free text, goes in <description>
    vcpus: int
    memory_mib: int
    disk_gib: int  # overlay virtual size, at least the base image's
    base_image: str  # absolute path of the read-only base qcow2 on the host
    storage_dir: str  # host directory (a libvirt dir pool) for overlays and seeds
    virt_type: str  # "qemu" | "kvm", already resolved (Driver.resolve_virt_type)
    network: str = "user"  # "user" | "bridge"
    ssh_port: int | None = None  # user mode: 127.0.0.1:ssh_port -> guest port 22
    bridge: str = ""  # bridge mode: the host bridge
    mac: str = ""  # optional, stable across resets
    metadata: dict[str, str] = field(default_factory=dict)
    # Block volumes attached to it, in the order of their targets (vdb, vdc, ...): a
    # domain defined from the spec (provision, reset, a cold move) has them attached.
    volumes: tuple[VolumeSpec, ...] = ()
    # Published ports (user mode): forwarded beside SSH by every domain defined from the
    # spec (provision, reset, restore, a move's destination).
    ports: tuple[PortSpec, ...] = ()
    # Shared directories (virtiofs; the domain then has shared memory): see ShareSpec.
    shares: tuple[ShareSpec, ...] = ()
    # Its second NIC, on the group's private network (None: the host has none).
    group_nic: GroupNic | None = None

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise HypervisorError(f"invalid VM spec for {self.name!r}: " + "; ".join(problems))

    @property
    def overlay_name(self) -> str:
        return f"{self.name}.qcow2"

    @property
    def seed_name(self) -> str:
        return f"{self.name}-seed.iso"


def _spec_problems(spec: VmSpec) -> list[str]:
    problems = []
    if not (spec.name.startswith(DOMAIN_PREFIX) and _NAME_RE.fullmatch(spec.name)):
        problems.append(
            f"the name must start with {DOMAIN_PREFIX!r} and use only a-z, 0-9 and '-' "
            "(at most 55 characters)"
        )
    try:
        uuidlib.UUID(spec.uuid)
    except (ValueError, TypeError, AttributeError):
        problems.append(f"{spec.uuid!r} is not a UUID")
    if not 1 <= spec.vcpus <= 64:
        problems.append("vcpus must be between 1 and 64")
    if not 128 <= spec.memory_mib <= 1024 * 1024:
        problems.append("memory must be at least 128 MiB")
    if not 1 <= spec.disk_gib <= 16 * 1024:
        problems.append("the disk must be between 1 GiB and 16 TiB")
    for label, path in (("base image", spec.base_image), ("storage directory", spec.storage_dir)):
        if not (isinstance(path, str) and os.path.isabs(path)) or NOT_XML.search(path):
            problems.append(f"the {label} must be an absolute path")
    if spec.virt_type not in VIRT_TYPES:
        problems.append(f"virt type must be one of {', '.join(VIRT_TYPES)} (resolve 'auto' first)")
    if spec.network not in NETWORK_MODES:
        problems.append(f"network must be one of {', '.join(NETWORK_MODES)}")
    if spec.network == "user" and spec.ssh_port is not None and not 1024 <= spec.ssh_port <= 65535:
        problems.append("the SSH port must be between 1024 and 65535")
    if spec.network == "bridge" and not _BRIDGE_RE.fullmatch(spec.bridge or ""):
        problems.append("bridge mode needs a bridge name (letters, digits, '_.-', 15 at most)")
    if spec.mac and not _MAC_RE.fullmatch(spec.mac):
        problems.append("the MAC address must look like 52:54:00:12:34:56 (lower case)")
    for key, value in spec.metadata.items():
        if not (isinstance(key, str) and _META_KEY_RE.fullmatch(key)):
            problems.append(f"metadata key {key!r} must be letters, digits, '_.-'")
        if not isinstance(value, str):
            problems.append(f"metadata value of {key!r} must be text")
    serials = [v.serial for v in spec.volumes if isinstance(v, VolumeSpec)]
    if len(serials) != len(spec.volumes) or len(set(serials)) != len(serials):
        problems.append("volumes must be VolumeSpecs with serials of their own")
    if len(spec.volumes) > MAX_VOLUMES:
        problems.append(f"at most {MAX_VOLUMES} volumes")
    tags = [s.tag for s in spec.shares if isinstance(s, ShareSpec)]
    if len(tags) != len(spec.shares) or len(set(tags)) != len(tags):
        problems.append("shares must be ShareSpecs with tags of their own")
    if len(spec.shares) > MAX_SHARES:
        problems.append(f"at most {MAX_SHARES} shares")
    problems.extend(_port_problems(spec))
    return problems


def _port_problems(spec: VmSpec) -> list[str]:
    if not spec.ports:
        return []
    if spec.network != "user":
        return ["published ports need user-mode networking"]
    if not all(isinstance(p, PortSpec) for p in spec.ports):
        return ["ports must be PortSpecs"]
    problems = []
    host_ports = [p.host_port for p in spec.ports]
    if len(set(host_ports)) != len(host_ports) or spec.ssh_port in host_ports:
        problems.append("each published port needs a host port of its own (not SSH's)")
    guest_ports = [p.guest_port for p in spec.ports]
    if len(set(guest_ports)) != len(guest_ports):
        problems.append("a guest port is published once")
    return problems


def validate_snapshot_name(snapshot: str) -> None:
    if not (
        isinstance(snapshot, str)
        and 1 <= len(snapshot) <= SNAPSHOT_NAME_MAX
        and all(c.isalnum() or c in "-_." for c in snapshot)
    ):
        raise HypervisorError(
            f"invalid snapshot name {snapshot!r}: use letters, digits, '-', '_' and '.', "
            f"up to {SNAPSHOT_NAME_MAX} characters"
        )


@dataclass(frozen=True)
class DomainState:
    uuid: str
    name: str
    state: str  # one of STATES


@dataclass(frozen=True)
class ConsoleEndpoint:
    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""
    # The desktop name the VNC server announces in its ServerInit: the console proxy
    # refuses a server that names another VM.
    desktop_name: str = ""


# --- the protocol --------------------------------------------------------------------------


class Driver(Protocol):
    """Blocking operations on one hypervisor host. Instances are cheap; a driver keeps
    its connection per host itself."""

    host: str  # the host's name, for messages

    def close(self) -> None: ...

    def resolve_virt_type(self, requested: str) -> str:
        """``qemu`` or ``kvm`` for a host setting of ``qemu``, ``kvm`` or ``auto``."""

    # VMs as a whole
    def provision(
        self, spec: VmSpec, *, seed_iso: bytes, progress: Progress | None = None
    ) -> None: ...
    def reset(
        self, spec: VmSpec, *, seed_iso: bytes, progress: Progress | None = None
    ) -> None: ...
    def delete(self, spec: VmSpec) -> None: ...

    # power
    def start(self, name: str) -> None: ...
    def shutdown(
        self, name: str, *, timeout: float = 60, progress: Progress | None = None
    ) -> bool: ...
    def reboot(self, name: str) -> None: ...
    def force_off(self, name: str) -> None: ...
    def suspend(self, name: str) -> None: ...
    def managed_save(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...

    # snapshots
    def snapshot_create(self, name: str, snapshot: str, *, with_memory: bool) -> None: ...
    def snapshot_revert(self, name: str, snapshot: str, *, start_after: bool = False) -> None: ...
    def snapshot_delete(self, name: str, snapshot: str) -> None: ...
    def snapshot_names(self, name: str) -> list[str]: ...

    # access inside the running guest (its agent)
    def guest_ssh_set(
        self,
        name: str,
        *,
        accounts: list[str],
        key: str,
        retired_keys: list[str],
        revoked: list[str],
        timeout: float = 120,
    ) -> None: ...

    # what the idle rule measures (labs/compute/idle.py): who is logged in inside a running
    # guest (None: the agent did not answer), the CPU time (ns) of each running domain
    def guest_users(self, name: str, *, timeout: float = 5) -> list[str] | None: ...
    def cpu_times(self) -> dict[str, int]: ...

    # what is there
    def state(self, name: str) -> str: ...
    def states(self) -> dict[str, DomainState]: ...
    def console(self, name: str) -> ConsoleEndpoint: ...

    # registering a host: it answers, its storage directory is usable (made if missing),
    # and which of ``base_images`` it holds ({"libvirt": version, path: "present"|why})
    def host_check(self, *, storage_dir: str, base_images: list[str]) -> dict[str, str]: ...

    # archives (the end of term): the shut-off VM's disk flattened into a standalone
    # compressed qcow2 on this machine; a VM made again around such a disk.
    def disk_export(self, spec: VmSpec, dest: str) -> None: ...
    def restore(
        self, spec: VmSpec, *, disk: str, seed_iso: bytes, progress: Progress | None = None
    ) -> None: ...

    # moving between hosts: the stopped VM ``source`` here is made to exist as ``target``
    # on ``to`` (a driver of the same kind), its disk, seed and snapshots with it, or
    # nothing is left there; this host's copy stays for the caller to delete once its
    # rows name the destination. Returns timings (seconds, MiB).
    def copy_offline(
        self,
        to: Driver,
        *,
        source: VmSpec,
        target: VmSpec,
        seed_iso: bytes,
        progress: Progress | None = None,
    ) -> dict[str, float]: ...

    # the running VM ``source`` migrated live to ``to`` as ``target``: afterwards it runs
    # only there (this host's volumes stay for the caller to delete), or, on failure, it
    # still runs here and nothing is left there. Timings include the guest's pause.
    def move_live(
        self,
        to: Driver,
        *,
        source: VmSpec,
        target: VmSpec,
        seed_iso: bytes,
        progress: Progress | None = None,
    ) -> dict[str, float]: ...

    # block volumes: a standalone qcow2 in ``storage_dir`` (made if missing, kept if it
    # is there), attached to the domain ``name`` (live and in its definition when it runs,
    # in its definition when it is off), detached (a running guest is asked to let go and
    # waited for, up to ``timeout``), deleted (gone already: fine). Each returns seconds.
    def volume_create(self, *, storage_dir: str, volume: VolumeSpec) -> float: ...
    def volume_attach(self, name: str, *, storage_dir: str, volume: VolumeSpec) -> float: ...
    def volume_detach(self, name: str, *, volume: VolumeSpec, timeout: float = 30) -> float: ...
    def volume_delete(self, *, storage_dir: str, volume: VolumeSpec) -> float: ...
    # which volumes (serials) the domain's definition holds
    def volume_serials(self, name: str) -> list[str]: ...

    # course images (labs/compute/images.py): the VM's disk flattened and sealed (no SSH
    # host keys, machine-id, authorized_keys) into a standalone qcow2 at ``dest`` on this
    # machine, its file systems frozen through the guest agent while it is read if it
    # runs (timings returned); a local image file copied to ``path`` on this host (never
    # over another file); the sha256 of the file at ``path`` on this host, None if absent.
    def image_capture(
        self, spec: VmSpec, dest: str, *, compress: bool, progress: Progress | None = None
    ) -> dict[str, float]: ...
    def image_put(self, source: str, path: str) -> None: ...
    def image_digest(self, path: str) -> str | None: ...

    # published ports (user mode): the domain ``name`` forwards exactly SSH's ``ssh_port``
    # and ``ports``, in its definition (so every later start has them) and, when it runs,
    # in its QEMU at once (added and removed live). Idempotent; returns seconds.
    def ports_apply(
        self, name: str, *, ssh_port: int | None, ports: tuple[PortSpec, ...]
    ) -> float: ...

    # Room for what the next issues add behind the same seam:
    # networks (define, attach a NIC).
    # group networks (labs/compute/networks.py): the group's network on this host made to
    # hold exactly ``spec`` (defined and started if missing, DHCP/DNS entries added and
    # removed live, its VXLAN tunnel and peers set); one VM's entry taken out live; the
    # network removed once no VM of the group runs here. Each returns seconds.
    def network_ensure(self, spec: GroupNetworkSpec) -> float: ...
    def network_host_remove(self, spec: GroupNetworkSpec, host: NetworkHost) -> float: ...
    def network_remove(self, spec: GroupNetworkSpec) -> float: ...
    # the group's firewall (labs/compute/firewall.py): its filter on this host redefined
    # to ``spec.firewall``; running NICs get it at once. Returns seconds.
    def firewall_apply(self, spec: GroupNetworkSpec) -> float: ...
