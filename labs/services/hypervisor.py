"""The one adapter between Stratus and libvirt: the only module that imports ``libvirt``.

Callers get a :class:`Hypervisor` for a host with :func:`hypervisor_for` and pass plain
dataclasses (:class:`VmSpec`); they never see a libvirt object. Every call blocks (it is
made from Celery workers, never from the event loop) and raises one of three errors:

- :class:`HypervisorUnavailable`: transient, retry later (host did not answer, connection
  dropped, an operation timed out waiting for a lock or the guest agent);
- :class:`DomainMissing`: the VM does not exist on the host;
- :class:`HypervisorError`: anything else, permanent (bad input, missing base image, ...).

Operations are idempotent where that makes sense: a retried ``provision`` finds the disk,
seed and domain that already exist and finishes the rest; starting a running VM, stopping
a stopped one or deleting something already gone is a no-op. See docs/hypervisor.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import libvirt

log = logging.getLogger(__name__)

# Stratus only ever looks at, lists or touches domains whose name starts with this.
DOMAIN_PREFIX = "stratus-"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
STRATUS_NS = "https://stratus.invalid/xmlns/libvirt/vm/1"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
SSH_GUEST_PORT = 22
# Keepalive: a probe every 5 s, the connection is dead after 3 unanswered ones.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
SHUTDOWN_POLL_SECONDS = 0.5
SHUTDOWN_RESEND_SECONDS = 15  # an ACPI press during early boot is lost: press again

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("stratus", STRATUS_NS)

Progress = Callable[[str], object]
GiB = 1024**3


# --- errors --------------------------------------------------------------------------------


class HypervisorError(Exception):
    """A hypervisor operation failed and retrying will not help."""


class HypervisorUnavailable(HypervisorError):
    """The host did not answer or was busy; the same call may succeed later."""


class DomainMissing(HypervisorError):
    """The VM does not exist on the host (or, for a console, is not running)."""


# Error codes that mean "try again later" whatever part of libvirt raised them.
_TRANSIENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
# Generic codes that are transient when the transport raised them (connection refused,
# connection reset, "client socket is closed", ssh failures).
_TRANSPORT_DOMAINS = frozenset(
    {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_SSH, libvirt.VIR_FROM_LIBSSH}
)
_TRANSPORT_CODES = frozenset({libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR})


def _is_transient(error: libvirt.libvirtError) -> bool:
    code, domain = error.get_error_code(), error.get_error_domain()
    return code in _TRANSIENT_CODES or (code in _TRANSPORT_CODES and domain in _TRANSPORT_DOMAINS)


def _classify(error: libvirt.libvirtError, *, host: str, doing: str) -> HypervisorError:
    """The one place that turns a libvirtError into a Stratus error with a readable message."""
    detail = (error.get_error_message() or str(error)).strip()
    if _is_transient(error):
        return HypervisorUnavailable(f"host {host} did not answer while {doing}: {detail}")
    if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainMissing(f"{doing} failed: the VM does not exist on host {host}")
    return HypervisorError(f"{doing} failed on host {host}: {detail}")


def _code(error: libvirt.libvirtError) -> int:
    return error.get_error_code()


# --- connections ---------------------------------------------------------------------------

_connections: dict[str, libvirt.virConnect] = {}
_uri_locks: dict[str, threading.Lock] = {}
_cache_lock = threading.Lock()
_owner_pid = os.getpid()
_event_loop_lock = threading.Lock()
_event_loop_pid: int | None = None
_event_impl_registered = False


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


def _ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (needed for keepalive), once.

    Lazy and per process: a forked Celery child starts its own thread on first use.
    """
    global _event_loop_pid, _event_impl_registered
    with _event_loop_lock:
        if _event_loop_pid == os.getpid():
            return
        if not _event_impl_registered:
            libvirt.virEventRegisterDefaultImpl()
            _event_impl_registered = True
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_pid = os.getpid()


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # keep the loop alive whatever a callback did
            log.exception("libvirt event loop iteration failed")
            time.sleep(1)


def _forget_after_fork() -> None:
    """A forked child must not use (or close) its parent's connections."""
    global _owner_pid
    if os.getpid() != _owner_pid:
        with _cache_lock:
            _inherited.extend(_connections.values())  # never closed: the parent owns them
            _connections.clear()
            _uri_locks.clear()
            _owner_pid = os.getpid()


_inherited: list[libvirt.virConnect] = []


def _on_close(conn: libvirt.virConnect, reason: int, uri: str) -> None:
    """libvirt closed the connection (keepalive timeout, EOF): the next call reconnects."""
    with _cache_lock:
        if _connections.get(uri) is conn:
            del _connections[uri]
    log.warning("libvirt connection to %s closed (reason %s); will reconnect", uri, reason)


def _drop_connection(uri: str) -> None:
    with _cache_lock:
        conn = _connections.pop(uri, None)
    if conn is not None:
        with suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with suppress(libvirt.libvirtError):
            conn.close()


def _connection(uri: str, *, host: str) -> libvirt.virConnect:
    _forget_after_fork()
    with _cache_lock:
        lock = _uri_locks.setdefault(uri, threading.Lock())
    with lock:
        conn = _connections.get(uri)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            _drop_connection(uri)
        is_test = uri.startswith("test:")
        if not is_test:
            _ensure_event_loop()
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise _classify_connect(error, host=host, uri=uri) from error
        if not is_test:
            # The test driver has neither keepalive nor close callbacks.
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
                conn.registerCloseCallback(_on_close, uri)
            except libvirt.libvirtError as error:
                log.warning("no keepalive on %s: %s", uri, error.get_error_message())
        with _cache_lock:
            _connections[uri] = conn
        log.info("connected to %s (host %s)", uri, host)
        return conn


def _classify_connect(error: libvirt.libvirtError, *, host: str, uri: str) -> HypervisorError:
    detail = (error.get_error_message() or str(error)).strip()
    if _is_transient(error):
        return HypervisorUnavailable(f"host {host} did not answer: {detail}")
    return HypervisorError(f"cannot connect to host {host} ({uri}): {detail}")


# --- specs ---------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9-]{1,55}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_META_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# Characters XML 1.0 cannot carry at all, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
TITLE_MAX, DESCRIPTION_MAX, SNAPSHOT_NAME_MAX = 200, 10_000, 64
VIRT_TYPES = ("qemu", "kvm")
NETWORK_MODES = ("user", "bridge")


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
    virt_type: str  # "qemu" | "kvm", already resolved (Hypervisor.resolve_virt_type)
    network: str = "user"  # "user" | "bridge"
    ssh_port: int | None = None  # user mode: 127.0.0.1:ssh_port -> guest port 22
    bridge: str = ""  # bridge mode: the host bridge
    mac: str = ""  # optional, stable across resets
    metadata: dict[str, str] = field(default_factory=dict)

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
        if not (isinstance(path, str) and os.path.isabs(path)) or _NOT_XML.search(path):
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
    return problems


@dataclass(frozen=True)
class DomainState:
    uuid: str
    name: str
    state: str  # see STATE_NAMES


@dataclass(frozen=True)
class ConsoleEndpoint:
    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""


STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


# --- XML -----------------------------------------------------------------------------------


def _text(value: str, *, limit: int, one_line: bool = False) -> str:
    """Free text made safe for XML: no characters XML cannot carry, bounded length."""
    value = _NOT_XML.sub("", value)
    if one_line:
        value = " ".join(value.split())
    return value[:limit]


def _parse(xml: str) -> ET.Element:
    """Parse XML that libvirtd generated (live domain, pool, volume, capabilities)."""
    return ET.fromstring(xml)  # noqa: S314 - libvirtd's own output, not user input


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def build_domain_xml(spec: VmSpec, *, overlay_path: str, seed_path: str) -> str:
    """The libvirt domain XML for ``spec``, built with ElementTree (never by formatting)."""
    domain = ET.Element("domain", type=spec.virt_type)
    _sub(domain, "name", spec.name)
    _sub(domain, "uuid", spec.uuid)
    title = _text(spec.title, limit=TITLE_MAX, one_line=True)
    if title:  # libvirt's schema refuses an empty <title/>
        _sub(domain, "title", title)
    description = _text(spec.description, limit=DESCRIPTION_MAX)
    if description:
        _sub(domain, "description", description)
    if spec.metadata:
        vm = _sub(_sub(domain, "metadata"), f"{{{STRATUS_NS}}}vm")
        for key, value in sorted(spec.metadata.items()):
            _sub(vm, f"{{{STRATUS_NS}}}entry", _text(value, limit=DESCRIPTION_MAX), key=key)
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")

    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")  # ACPI shutdown
    _sub(features, "apic")
    if spec.virt_type == "kvm":
        _sub(domain, "cpu", mode="host-model")
    # TCG: no <cpu>, QEMU's default qemu64 model runs everywhere.
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=overlay_path)
    # The backing chain spelled out, so libvirt neither probes it nor relabels the shared
    # base image: without relabel='no' it chowns the base to the QEMU user (and leaves it
    # so), letting any QEMU process make it writable. QEMU only needs to read it.
    backing = _sub(disk, "backingStore", type="file")
    _sub(backing, "format", type="qcow2")
    base_source = _sub(backing, "source", file=spec.base_image)
    _sub(base_source, "seclabel", model="dac", relabel="no")
    _sub(backing, "backingStore")
    _sub(disk, "target", dev="vda", bus="virtio")

    # The cloud kernel has no AHCI driver: the seed must be an IDE CD-ROM on the pc machine.
    cdrom = _sub(devices, "disk", type="file", device="cdrom")
    _sub(cdrom, "driver", name="qemu", type="raw")
    _sub(cdrom, "source", file=seed_path)
    _sub(cdrom, "target", dev="hdc", bus="ide")
    _sub(cdrom, "readonly")

    _sub(devices, "controller", type="usb", model="none")
    if spec.network == "bridge":
        interface = _sub(devices, "interface", type="bridge")
        if spec.mac:
            _sub(interface, "mac", address=spec.mac)
        _sub(interface, "source", bridge=spec.bridge)
        _sub(interface, "model", type="virtio")

    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    # VNC on loopback only (QEMU offers no VNC authentication): the portal proxies it.
    graphics = _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")
    _sub(graphics, "listen", type="address", address="127.0.0.1")
    video = _sub(devices, "video")
    _sub(video, "model", type="vga")  # plain VGA: a readable text console in noVNC
    _sub(devices, "memballoon", model="virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    if spec.network == "user":
        commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
        for arg in _user_network_args(spec):
            _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(domain, encoding="unicode")


def _user_network_args(spec: VmSpec) -> list[str]:
    """QEMU slirp, cut off from everything but the SSH forward on the host's loopback.

    libvirt's own user-mode interface has neither ``restrict`` nor port forwards (and
    passt is disabled on Debian 12), hence the QEMU namespace; libvirt then marks the
    domain "tainted: custom-argv", which is expected.
    """
    netdev = "user,id=net0,restrict=on"
    if spec.ssh_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:{SSH_GUEST_PORT}"
    device = "virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10"
    if spec.mac:
        device += f",mac={spec.mac}"
    return ["-netdev", netdev, "-device", device]


def _volume_xml(name: str, *, capacity: int, fmt: str, backing: str | None = None) -> str:
    volume = ET.Element("volume")
    _sub(volume, "name", name)
    _sub(volume, "capacity", str(capacity), unit="bytes")
    _sub(volume, "allocation", "0", unit="bytes")
    target = _sub(volume, "target")
    _sub(target, "format", type=fmt)
    if backing is not None:
        backing_el = _sub(volume, "backingStore")
        _sub(backing_el, "path", backing)
        _sub(backing_el, "format", type="qcow2")
    return ET.tostring(volume, encoding="unicode")


def _pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    _sub(pool, "name", name)
    _sub(_sub(pool, "target"), "path", path)
    return ET.tostring(pool, encoding="unicode")


def _snapshot_xml(name: str) -> str:
    snapshot = ET.Element("domainsnapshot")
    _sub(snapshot, "name", name)
    return ET.tostring(snapshot, encoding="unicode")


def _validate_snapshot_name(snapshot: str) -> None:
    if not (
        isinstance(snapshot, str)
        and 1 <= len(snapshot) <= SNAPSHOT_NAME_MAX
        and all(c.isalnum() or c in "-_." for c in snapshot)
    ):
        raise HypervisorError(
            f"invalid snapshot name {snapshot!r}: use letters, digits, '-', '_' and '.', "
            f"up to {SNAPSHOT_NAME_MAX} characters"
        )


# --- the adapter ---------------------------------------------------------------------------


def hypervisor_for(uri: str, *, host_name: str = "") -> Hypervisor:
    """The adapter for one libvirt URI. Cheap: the connection is shared per URI."""
    return Hypervisor(uri, host_name=host_name)


class Hypervisor:
    """Blocking operations on one libvirt host (``qemu:///system``, ``qemu+ssh://…``).

    Instances are cheap; the underlying connection is cached per URI (thread-safe), kept
    alive with keepalive probes, and re-opened on the next call after it drops.
    """

    def __init__(self, uri: str, *, host_name: str = "") -> None:
        self.uri = uri
        self.host = host_name or uri

    def __repr__(self) -> str:
        return f"<Hypervisor {self.host} {self.uri}>"

    def close(self) -> None:
        """Close this URI's cached connection (tests; workers keep it for their lifetime)."""
        _drop_connection(self.uri)

    # -- plumbing --

    @property
    def _conn(self) -> libvirt.virConnect:
        return _connection(self.uri, host=self.host)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as error:
            mapped = _classify(error, host=self.host, doing=doing)
            if isinstance(mapped, HypervisorUnavailable):
                self._drop_if_dead()
                log.warning("%s", mapped)
            else:
                log.info("%s", mapped)
            raise mapped from error

    def _drop_if_dead(self) -> None:
        with _cache_lock:
            conn = _connections.get(self.uri)
        if conn is None:
            return
        try:
            alive = conn.isAlive()
        except libvirt.libvirtError:
            alive = False
        if not alive:
            _drop_connection(self.uri)

    def _domain(self, name: str) -> libvirt.virDomain:
        with self._errors(f"looking up VM {name}"):
            try:
                return self._conn.lookupByName(name)
            except libvirt.libvirtError as error:
                if _code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise DomainMissing(f"VM {name} does not exist on host {self.host}") from None
                raise

    def _domain_or_none(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._domain(name)
        except DomainMissing:
            return None

    def _domain_by_uuid(self, uuid: str) -> libvirt.virDomain | None:
        with self._errors(f"looking up VM {uuid}"):
            try:
                return self._conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as error:
                if _code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

    @staticmethod
    def _state_of(dom: libvirt.virDomain) -> str:
        return STATE_NAMES.get(dom.state()[0], "nostate")

    # -- capabilities --

    def resolve_virt_type(self, requested: str) -> str:
        """``qemu`` or ``kvm`` for a host setting of ``qemu``, ``kvm`` or ``auto``.

        ``auto`` resolves to ``qemu`` (TCG): a host can advertise KVM and still be unusable
        (nested PVM: /dev/kvm exists, the guest never boots), so KVM is only ever used when
        an operator sets it for the host. ``kvm`` is checked against the host's
        capabilities.
        """
        if requested == "qemu":
            return "qemu"
        if requested == "auto":
            log.info("host %s: virt type auto -> qemu (TCG); set kvm explicitly", self.host)
            return "qemu"
        if requested != "kvm":
            raise HypervisorError(f"unknown virt type {requested!r}: use qemu, kvm or auto")
        with self._errors("reading host capabilities"):
            caps = _parse(self._conn.getCapabilities())
        offered = caps.findall("./guest[os_type='hvm']/arch[@name='x86_64']/domain[@type='kvm']")
        if not offered:
            raise HypervisorError(
                f"host {self.host} does not offer KVM for x86_64 guests; set its virt type to qemu"
            )
        log.info("host %s: virt type kvm", self.host)
        return "kvm"

    # -- storage --

    def _pool_for(self, path: str, *, create: bool) -> libvirt.virStoragePool:
        """The active dir pool whose target is ``path`` (found by path, whatever its name).

        Missing: defined as ``stratus-<hash of path>``; with ``create`` also built (which
        makes a missing directory and leaves an existing one alone) and set to autostart.
        """
        path = os.path.normpath(path)
        with self._errors(f"preparing storage {path}"):
            pool, defined_now = self._find_pool(path), False
            if pool is None:
                name = DOMAIN_PREFIX + hashlib.sha256(path.encode()).hexdigest()[:12]
                try:
                    pool = self._conn.storagePoolDefineXML(_pool_xml(name, path), 0)
                    defined_now = True
                except libvirt.libvirtError:
                    pool = self._find_pool(path)  # another worker defined it meanwhile
                    if pool is None:
                        raise
            if not pool.isActive():
                try:
                    if create:
                        pool.build(0)
                    pool.create(0)
                except libvirt.libvirtError:
                    if not pool.isActive():
                        if defined_now:  # leave no pool behind for a directory we cannot use
                            with suppress(libvirt.libvirtError):
                                pool.undefine()
                        raise
            if defined_now:
                log.info("storage pool %s for %s on %s", pool.name(), path, self.host)
            if create and not pool.autostart():
                pool.setAutostart(1)
            return pool

    def _find_pool(self, path: str) -> libvirt.virStoragePool | None:
        for pool in self._conn.listAllStoragePools(0):
            target = _parse(pool.XMLDesc(0)).findtext("./target/path")
            if target and os.path.normpath(target) == path:
                return pool
        return None

    def _volume(self, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        """The volume ``name`` in ``pool``, or None; refreshes once for files made outside."""
        for attempt in range(2):
            try:
                return pool.storageVolLookupByName(name)
            except libvirt.libvirtError as error:
                if _code(error) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            if attempt == 0:
                try:
                    pool.refresh(0)
                except libvirt.libvirtError as error:  # e.g. another worker's upload runs
                    if _is_transient(error):
                        raise
                    log.info("could not refresh pool %s: %s", pool.name(), error)
                    return None
        return None

    def _base_volume(self, base_image: str) -> libvirt.virStorageVol:
        directory, filename = os.path.split(os.path.normpath(base_image))
        try:
            pool = self._pool_for(directory, create=False)
        except HypervisorUnavailable:
            raise
        except HypervisorError as error:
            cause = error.__cause__
            detail = (
                cause.get_error_message() if isinstance(cause, libvirt.libvirtError) else error
            )
            raise HypervisorError(
                f"base image {base_image} is missing on host {self.host} ({detail})"
            ) from error
        with self._errors(f"checking base image {base_image}"):
            volume = self._volume(pool, filename)
        if volume is None:
            raise HypervisorError(f"base image {base_image} is missing on host {self.host}")
        return volume

    def _ensure_overlay(
        self, pool: libvirt.virStoragePool, spec: VmSpec, base: libvirt.virStorageVol
    ) -> libvirt.virStorageVol:
        base_path = base.path()
        with self._errors(f"creating the disk of {spec.name}"):
            volume = self._volume(pool, spec.overlay_name)
            if volume is None:
                xml = _volume_xml(
                    spec.overlay_name,
                    capacity=spec.disk_gib * GiB,
                    fmt="qcow2",
                    backing=base_path,
                )
                volume = pool.createXML(xml, 0)
                log.info("created overlay %s on %s", volume.path(), base_path)
                return volume
        backing = _parse(volume.XMLDesc(0)).findtext("./backingStore/path")
        if backing != base_path:
            raise HypervisorError(
                f"disk {volume.path()} on host {self.host} exists but is based on "
                f"{backing or 'nothing'}, not {base_path}; delete the VM first"
            )
        return volume

    def _write_seed(
        self, pool: libvirt.virStoragePool, spec: VmSpec, seed_iso: bytes
    ) -> libvirt.virStorageVol:
        """Create (or replace) the seed volume and upload ``seed_iso`` into it."""
        with self._errors(f"writing the cloud-init seed of {spec.name}"):
            old = self._volume(pool, spec.seed_name)
            if old is not None:
                old.delete(0)
            volume = pool.createXML(
                _volume_xml(spec.seed_name, capacity=len(seed_iso), fmt="raw"), 0
            )
            self._upload(volume, seed_iso)
            return volume

    def _upload(self, volume: libvirt.virStorageVol, data: bytes) -> None:
        stream = self._conn.newStream(0)
        try:
            volume.upload(stream, 0, len(data), 0)
        except libvirt.libvirtError as error:
            if _code(error) == libvirt.VIR_ERR_NO_SUPPORT and self.uri.startswith("test:"):
                # libvirt's test driver keeps volumes as metadata and cannot upload; write
                # the bytes where the volume claims to be so tests can read them back.
                with open(volume.path(), "wb") as handle:
                    handle.write(data)
                return
            raise
        try:
            for offset in range(0, len(data), 256 * 1024):
                stream.send(data[offset : offset + 256 * 1024])
            stream.finish()
        except BaseException:
            with suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def _delete_volumes(self, name: str, storage_dir: str) -> None:
        try:
            pool = self._pool_for(storage_dir, create=False)
        except HypervisorUnavailable:
            raise
        except HypervisorError as error:  # no usable directory: no volumes in it either
            log.warning("no volumes of %s to delete on %s: %s", name, self.host, error)
            return
        with self._errors(f"deleting the disks of {name}"):
            for volume_name in (f"{name}.qcow2", f"{name}-seed.iso"):
                volume = self._volume(pool, volume_name)
                if volume is not None:
                    volume.delete(0)
                    log.info("deleted volume %s on %s", volume_name, self.host)

    # -- provisioning --

    def provision(
        self, spec: VmSpec, *, seed_iso: bytes, progress: Progress | None = None
    ) -> None:
        """Make ``spec`` exist and run: disk overlay, seed, domain, started.

        Idempotent: whatever exists already is kept (an existing domain is not redefined;
        see :meth:`reset`), and the rest is done. The seed is (re)written only while the
        domain is not defined yet, so a retry after an interrupted upload never boots a
        truncated seed.
        """
        report = progress or (lambda _message: None)
        started = time.monotonic()
        report("checking the base image")
        base = self._checked_base(spec)
        dom = self._own_domain(spec)
        report("preparing storage")
        pool = self._pool_for(spec.storage_dir, create=True)
        report("creating disk")
        overlay = self._ensure_overlay(pool, spec, base)
        if dom is None:
            report("writing cloud-init seed")
            seed = self._write_seed(pool, spec, seed_iso)
            report("defining VM")
            xml = build_domain_xml(spec, overlay_path=overlay.path(), seed_path=seed.path())
            with self._errors(f"defining VM {spec.name}"):
                dom = self._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            log.info("defined %s (%s) on %s", spec.name, spec.uuid, self.host)
        report("starting VM")
        self._start(dom)
        log.info(
            "provisioned %s on %s in %.1f s", spec.name, self.host, time.monotonic() - started
        )

    def _checked_base(self, spec: VmSpec) -> libvirt.virStorageVol:
        """The base image volume, after checking it exists and fits in the VM's disk."""
        base = self._base_volume(spec.base_image)
        with self._errors(f"checking base image {spec.base_image}"):
            base_size = base.info()[1]
        if spec.disk_gib * GiB < base_size:
            raise HypervisorError(
                f"a {spec.disk_gib} GiB disk is smaller than base image {spec.base_image} "
                f"({base_size / GiB:.1f} GiB)"
            )
        return base

    def reset(self, spec: VmSpec, *, seed_iso: bytes, progress: Progress | None = None) -> None:
        """Back to baseline: a fresh overlay and seed, the same uuid and SSH port, started.

        The domain is undefined and defined again from ``spec`` (so it also picks up a
        changed spec), and its snapshots go with the old overlay they lived in. The new
        seed should carry a new instance-id so cloud-init sets the guest up again.
        """
        report = progress or (lambda _message: None)
        report("checking the base image")
        self._checked_base(spec)  # before anything is removed: never reset into nothing
        report("removing the old disk")
        self._remove(spec)
        self.provision(spec, seed_iso=seed_iso, progress=progress)

    def delete(self, spec: VmSpec) -> None:
        """Remove the VM completely: domain, snapshots, overlay and seed. Idempotent."""
        self._remove(spec)

    def _remove(self, spec: VmSpec) -> None:
        dom = self._own_domain(spec)
        if dom is not None:
            self._force_off(dom)
            with self._errors(f"removing VM {spec.name}"):
                try:
                    dom.undefineFlags(_UNDEFINE_ALL)
                except libvirt.libvirtError as error:
                    if _code(error) in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                        dom.undefineFlags(_UNDEFINE_BASIC)  # drivers without NVRAM/checkpoints
                    elif _code(error) != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            log.info("undefined %s on %s", spec.name, self.host)
        self._delete_volumes(spec.name, spec.storage_dir)

    def _own_domain(self, spec: VmSpec) -> libvirt.virDomain | None:
        """The domain of ``spec`` if it exists; an error if name and uuid disagree."""
        by_uuid = self._domain_by_uuid(spec.uuid)
        if by_uuid is not None:
            if by_uuid.name() != spec.name:
                raise HypervisorError(
                    f"host {self.host} has VM id {spec.uuid} under the name {by_uuid.name()}, "
                    f"not {spec.name}"
                )
            return by_uuid
        by_name = self._domain_or_none(spec.name)
        if by_name is not None:
            raise HypervisorError(
                f"host {self.host} already has a VM named {spec.name} with another id "
                f"({by_name.UUIDString()}); it does not belong to this request"
            )
        return None

    # -- lifecycle --

    def state(self, name: str) -> str:
        dom = self._domain(name)
        with self._errors(f"reading the state of {name}"):
            return self._state_of(dom)

    def states(self) -> dict[str, DomainState]:
        """Every Stratus domain on the host, keyed by uuid, from one round trip.

        ``getAllDomainStats`` returns each domain with its state in one call (a
        ``listAllDomains`` followed by ``state()`` per domain would be one call per VM).
        """
        with self._errors("listing VMs"):
            stats = self._conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            result = {}
            for dom, values in stats:
                name = dom.name()
                if not name.startswith(DOMAIN_PREFIX):
                    continue
                state = STATE_NAMES.get(values.get("state.state", 0), "nostate")
                result[dom.UUIDString()] = DomainState(dom.UUIDString(), name, state)
            return result

    def start(self, name: str) -> None:
        """Start (or resume) the VM; a running VM is left alone."""
        self._start(self._domain(name))

    def _start(self, dom: libvirt.virDomain) -> None:
        with self._errors(f"starting VM {dom.name()}"):
            state = dom.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            elif state == libvirt.VIR_DOMAIN_PMSUSPENDED:
                dom.pMWakeup(0)
            elif not dom.isActive():
                try:
                    dom.create()
                except libvirt.libvirtError:
                    if not dom.isActive():  # someone else started it meanwhile: fine
                        raise
                log.info("started %s on %s", dom.name(), self.host)

    def force_off(self, name: str) -> None:
        """Pull the plug; a VM that is off is left alone."""
        self._force_off(self._domain(name))

    def _force_off(self, dom: libvirt.virDomain) -> None:
        with self._errors(f"forcing VM {dom.name()} off"):
            if dom.isActive():
                try:
                    dom.destroy()
                except libvirt.libvirtError:
                    if dom.isActive():
                        raise
                log.info("forced %s off on %s", dom.name(), self.host)

    def shutdown(self, name: str, *, timeout: float = 60) -> bool:
        """Ask the guest to power off; force it off after ``timeout`` seconds.

        Returns whether the guest shut down by itself (an already stopped VM: True).
        libvirt uses the guest agent when it answers, else the ACPI power button.
        """
        dom = self._domain(name)
        deadline = time.monotonic() + timeout
        with self._errors(f"shutting down VM {name}"):
            if not dom.isActive():
                return True
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()  # a paused guest cannot see the power button
            next_press = 0.0
            while time.monotonic() < deadline:
                if not dom.isActive():
                    log.info("%s shut down on %s", name, self.host)
                    return True
                if time.monotonic() >= next_press:
                    try:
                        dom.shutdown()
                    except libvirt.libvirtError:
                        if dom.isActive():
                            raise
                    next_press = time.monotonic() + SHUTDOWN_RESEND_SECONDS
                time.sleep(SHUTDOWN_POLL_SECONDS)
            if not dom.isActive():
                return True
        log.warning(
            "%s did not shut down within %s s on %s; forcing off", name, timeout, self.host
        )
        self._force_off(dom)
        return False

    def reboot(self, name: str) -> None:
        """Ask the guest to reboot; a VM that is off is simply started."""
        dom = self._domain(name)
        with self._errors(f"rebooting VM {name}"):
            if not dom.isActive():
                self._start(dom)
                return
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            dom.reboot(0)

    # -- snapshots --

    def snapshot_create(self, name: str, snapshot: str, *, with_memory: bool) -> None:
        """Take an internal snapshot (it lives inside the VM's qcow2 overlay).

        A running VM is snapshotted with its memory (it comes back running); a shut-off VM
        gets a disk-only snapshot (it comes back shut off; ``with_memory`` changes nothing,
        there is no memory to keep). A disk-only snapshot of a *running* VM is refused:
        libvirt can only make that as an external snapshot, which it cannot revert.
        An existing snapshot of that name is left as it is.
        """
        _validate_snapshot_name(snapshot)
        dom = self._domain(name)
        with self._errors(f"snapshotting VM {name}"):
            if snapshot in dom.snapshotListNames(0):
                return
            if dom.isActive() and not with_memory:
                raise HypervisorError(
                    f"VM {name} is running: a snapshot of a running VM includes its memory. "
                    "Shut it down first for a disk-only snapshot."
                )
            started = time.monotonic()
            try:
                dom.snapshotCreateXML(_snapshot_xml(snapshot), 0)
            except libvirt.libvirtError:
                if snapshot not in dom.snapshotListNames(0):
                    raise
            log.info(
                "snapshot %s of %s (%s) on %s in %.2f s",
                snapshot,
                name,
                "with memory" if dom.isActive() else "disk only",
                self.host,
                time.monotonic() - started,
            )

    def snapshot_revert(self, name: str, snapshot: str, *, start_after: bool = False) -> None:
        """Go back to a snapshot: with memory it comes back running, disk-only shut off
        (then started if ``start_after``)."""
        dom = self._domain(name)
        with self._errors(f"reverting VM {name} to snapshot {snapshot}"):
            snap = self._snapshot(dom, snapshot)
            if snap is None:
                raise HypervisorError(f"VM {name} has no snapshot named {snapshot}")
            try:
                dom.revertToSnapshot(snap, 0)
            except libvirt.libvirtError as error:
                if _code(error) != libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY:
                    raise
                dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
        if start_after:
            self._start(dom)
        log.info("reverted %s to %s on %s", name, snapshot, self.host)

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete a snapshot; a missing snapshot (or VM) is fine."""
        dom = self._domain_or_none(name)
        if dom is None:
            return
        with self._errors(f"deleting snapshot {snapshot} of VM {name}"):
            snap = self._snapshot(dom, snapshot)
            if snap is None:
                return
            try:
                snap.delete(0)
            except libvirt.libvirtError as error:
                if _code(error) != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    raise

    def snapshot_names(self, name: str) -> list[str]:
        dom = self._domain(name)
        with self._errors(f"listing the snapshots of VM {name}"):
            return sorted(dom.snapshotListNames(0))

    @staticmethod
    def _snapshot(dom: libvirt.virDomain, snapshot: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(snapshot, 0)
        except libvirt.libvirtError as error:
            if _code(error) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise

    # -- console --

    def console(self, name: str) -> ConsoleEndpoint:
        """Where the running VM's VNC server listens, read from its live XML."""
        dom = self._domain(name)
        with self._errors(f"finding the console of VM {name}"):
            if not dom.isActive():
                raise DomainMissing(f"VM {name} is not running on host {self.host}")
            live = _parse(dom.XMLDesc(0))
        graphics = live.find("./devices/graphics[@type='vnc']")
        if graphics is None:
            raise HypervisorError(f"VM {name} on host {self.host} has no VNC console")
        for listen in graphics.findall("listen"):
            if listen.get("type") == "socket" and listen.get("socket"):
                return ConsoleEndpoint(kind="unix", path=listen.get("socket", ""))
        port = int(graphics.get("port", "-1"))
        if port <= 0:
            raise HypervisorError(f"VM {name} on host {self.host} has no VNC port yet")
        address = graphics.get("listen") or "127.0.0.1"
        for listen in graphics.findall("listen"):
            if listen.get("type") == "address" and listen.get("address"):
                address = listen.get("address", address)
        return ConsoleEndpoint(kind="tcp", host=address, port=port)


_UNDEFINE_BASIC = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)
_UNDEFINE_ALL = (
    _UNDEFINE_BASIC
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)
