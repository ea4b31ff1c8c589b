"""The libvirt driver: lifecycle, snapshots and consoles of Stratus VMs on one host.

Built from the package's parts: ``connection`` (one cached connection per URI),
``errors`` (libvirt's errors as the driver's three), ``xml`` (domain, volume, pool and
snapshot XML) and ``storage`` (pools, overlays, seeds). This package is the only place in
Stratus that imports ``libvirt``. See docs/hypervisor.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from labs.drivers import seal
from labs.drivers.base import (
    DOMAIN_PREFIX,
    ConsoleEndpoint,
    DomainMissing,
    DomainState,
    HypervisorError,
    HypervisorUnavailable,
    Progress,
    VmSpec,
    validate_snapshot_name,
)
from labs.drivers.libvirt import agent, archive, connection, images, migration, shares
from labs.drivers.libvirt.errors import classify, error_code
from labs.drivers.libvirt.networks import NetworksMixin
from labs.drivers.libvirt.ports import PortsMixin
from labs.drivers.libvirt.storage import GiB, StorageMixin
from labs.drivers.libvirt.volumes import VolumesMixin
from labs.drivers.libvirt.xml import build_domain_xml, parse, snapshot_xml, volume_xml
from labs.drivers.qcow2 import qcow2_info

log = logging.getLogger(__name__)

SHUTDOWN_POLL_SECONDS = 0.5
SHUTDOWN_RESEND_SECONDS = 15  # an ACPI press during early boot is lost: press again

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


def _saved_or(dom: libvirt.virDomain, state: str) -> str:
    """ "saved" for a shut-off domain with a managed save image (suspended to disk), else
    ``state``: libvirt reports such a domain as shut off."""
    if state == "shutoff" and dom.hasManagedSaveImage(0):
        return "saved"
    return state


class LibvirtDriver(StorageMixin, VolumesMixin, PortsMixin, NetworksMixin):
    """The :class:`~labs.drivers.base.Driver` for one libvirt host (``qemu:///system``,
    ``qemu+ssh://…``, ``qemu+tls://…``).

    Instances are cheap; the underlying connection is cached per URI (thread-safe), kept
    alive with keepalive probes, and re-opened on the next call after it drops.
    """

    def __init__(self, uri: str, *, host_name: str = "") -> None:
        self.uri = uri
        self.host = host_name or uri

    def __repr__(self) -> str:
        return f"<LibvirtDriver {self.host} {self.uri}>"

    def close(self) -> None:
        """Close this URI's cached connection (tests; workers keep it for their lifetime)."""
        connection.drop_connection(self.uri)

    # -- plumbing --

    @property
    def _conn(self) -> libvirt.virConnect:
        return connection.connection(self.uri, host=self.host)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as error:
            mapped = classify(error, host=self.host, doing=doing)
            if isinstance(mapped, HypervisorUnavailable):
                connection.drop_if_dead(self.uri)
                log.warning("%s", mapped)
            else:
                log.info("%s", mapped)
            raise mapped from error

    def _domain(self, name: str) -> libvirt.virDomain:
        with self._errors(f"looking up VM {name}"):
            try:
                return self._conn.lookupByName(name)
            except libvirt.libvirtError as error:
                if error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
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
                if error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

    @staticmethod
    def _state_of(dom: libvirt.virDomain) -> str:
        return _saved_or(dom, STATE_NAMES.get(dom.state()[0], "nostate"))

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
            caps = parse(self._conn.getCapabilities())
        offered = caps.findall("./guest[os_type='hvm']/arch[@name='x86_64']/domain[@type='kvm']")
        if not offered:
            raise HypervisorError(
                f"host {self.host} does not offer KVM for x86_64 guests; set its virt type to qemu"
            )
        log.info("host %s: virt type kvm", self.host)
        return "kvm"

    # -- storage --

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
        if dom is not None and spec.volumes:
            # Internal snapshots live in every qcow2 of the domain: the overlay goes, but
            # its volumes stay and would keep them. libvirt takes them out of each disk.
            with self._errors(f"deleting the snapshots of {spec.name}"):
                for snap in dom.listAllSnapshots(0):
                    snap.delete(0)
        if dom is not None:
            self._force_off(dom)
            with self._errors(f"removing VM {spec.name}"):
                try:
                    dom.undefineFlags(_UNDEFINE_ALL)
                except libvirt.libvirtError as error:
                    if error_code(error) in (
                        libvirt.VIR_ERR_INVALID_ARG,
                        libvirt.VIR_ERR_NO_SUPPORT,
                    ):
                        dom.undefineFlags(_UNDEFINE_BASIC)  # drivers without NVRAM/checkpoints
                    elif error_code(error) != libvirt.VIR_ERR_NO_DOMAIN:
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
                state = _saved_or(dom, STATE_NAMES.get(values.get("state.state", 0), "nostate"))
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
                self._shares_prepare(dom)
                try:
                    dom.create()
                except libvirt.libvirtError:
                    if not dom.isActive():  # someone else started it meanwhile: fine
                        raise
                log.info("started %s on %s", dom.name(), self.host)

    def _shares_prepare(self, dom: libvirt.virDomain) -> None:
        """The host directories (and the read-only bind) of the domain's shares, before
        it starts; nothing on the test driver, which runs no virtiofsd."""
        if self.uri.startswith("test:"):
            return
        with self._errors(f"reading the shares of {dom.name()}"):
            definition = parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        try:
            shares.shares_prepare(definition)
        except OSError as error:
            raise HypervisorError(f"preparing the shares of {dom.name()}: {error}") from error

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

    def shutdown(
        self, name: str, *, timeout: float = 60, progress: Progress | None = None
    ) -> bool:
        """Ask the guest to power off; force it off after ``timeout`` seconds.

        Returns whether the guest shut down by itself (an already stopped VM: True).
        libvirt uses the guest agent when it answers, else the ACPI power button.
        """
        report = progress or (lambda _message: None)
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
                    if not next_press:
                        report("waiting for the guest to power off")
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

    def suspend(self, name: str) -> None:
        """Pause the VM in RAM (its vCPUs stop; memory, devices and connections stay).

        A paused VM is left alone; a VM that is not running cannot be paused.
        """
        dom = self._domain(name)
        with self._errors(f"suspending VM {name}"):
            state = dom.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return
            if not dom.isActive():
                raise HypervisorError(f"VM {name} is not running on host {self.host}")
            dom.suspend()
            log.info("suspended %s on %s", name, self.host)

    def managed_save(self, name: str) -> None:
        """Suspend the VM to disk: libvirt writes its memory and device state to a file on
        the host and ends QEMU, so the VM holds no RAM or vCPU; the next ``start`` restores
        it where it was (processes, files in /dev/shm). A VM already saved is left alone."""
        dom = self._domain(name)
        with self._errors(f"suspending VM {name} to disk"):
            if not dom.isActive():
                if dom.hasManagedSaveImage(0):
                    return
                raise HypervisorError(f"VM {name} is not running on host {self.host}")
            started = time.monotonic()
            dom.managedSave(0)
            # Ports published while it ran are in its QEMU, not in the XML saved with it.
            self.saved_forwards_match(dom)
            log.info(
                "saved %s to disk on %s in %.1f s", name, self.host, time.monotonic() - started
            )

    def resume(self, name: str) -> None:
        """Let a paused VM run on; a running VM is left alone."""
        dom = self._domain(name)
        with self._errors(f"resuming VM {name}"):
            if not dom.isActive():
                raise HypervisorError(f"VM {name} is not running on host {self.host}")
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
                log.info("resumed %s on %s", name, self.host)

    # -- snapshots --

    def snapshot_create(self, name: str, snapshot: str, *, with_memory: bool) -> None:
        """Take an internal snapshot (it lives inside the VM's qcow2 overlay).

        A running VM is snapshotted with its memory (it comes back running); a shut-off VM
        gets a disk-only snapshot (it comes back shut off; ``with_memory`` changes nothing,
        there is no memory to keep). A disk-only snapshot of a *running* VM is refused:
        libvirt can only make that as an external snapshot, which it cannot revert.
        An existing snapshot of that name is left as it is.
        """
        validate_snapshot_name(snapshot)
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
                dom.snapshotCreateXML(snapshot_xml(snapshot), 0)
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
            # The VM's published ports of now, not the snapshot's time's (labs/drivers/
            # libvirt/ports.py); the same snapshot is looked up again after its redefinition.
            self.snapshot_forwards_match(dom, snap)
            snap = self._snapshot(dom, snapshot)
            try:
                dom.revertToSnapshot(snap, 0)
            except libvirt.libvirtError as error:
                if error_code(error) != libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY:
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
                if error_code(error) != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
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
            if error_code(error) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise

    # -- access inside the guest (the guest agent) --

    def guest_ssh_set(
        self,
        name: str,
        *,
        accounts: list[str],
        key: str,
        retired_keys: list[str],
        revoked: list[str],
        timeout: float = 120,
    ) -> None:
        """Through the guest agent of the running VM: every one of ``accounts`` exists,
        may log in and holds ``key`` (and none of ``retired_keys``; keys a student added
        stay); every one of ``revoked`` is disabled (expired, keys removed, its processes
        ended). Waits up to ``timeout`` for an agent that is not up yet (a guest booting).
        """
        dom = self._domain(name)
        with self._errors(f"updating the SSH access of VM {name}"):
            if not dom.isActive():
                raise HypervisorError(f"VM {name} is not running on host {self.host}")
            started = time.monotonic()
            agent.wait_ready(dom, timeout=timeout, what=f"VM {name}")
            for user in revoked:
                agent.account_disable(dom, user)
            for user in accounts:
                agent.account_enable(dom, user)
                agent.keys_set(dom, user, keys=[key], remove=retired_keys)
        log.info(
            "SSH access of %s on %s: %d accounts, %d revoked, in %.2f s",
            name,
            self.host,
            len(accounts),
            len(revoked),
            time.monotonic() - started,
        )

    def guest_users(self, name: str, *, timeout: float = 5) -> list[str] | None:
        """Who is logged in inside the running VM (its guest agent reads utmp); None when
        the agent does not answer in ``timeout`` seconds, the VM is not running or not
        there: the caller cannot see inside it (labs/compute/idle.py counts that as in use).
        """
        try:
            dom = self._domain(name)
            with self._errors(f"asking the guest agent of {name} who is logged in"):
                if not dom.isActive():
                    return None
                return agent.users(dom, timeout=timeout)
        except HypervisorError:
            return None

    def cpu_times(self) -> dict[str, int]:
        """The cumulative CPU time (ns, all vCPUs) of every running Stratus domain, keyed
        by uuid, from one ``getAllDomainStats`` round trip (``dom.info()`` for a driver
        whose stats leave ``cpu.time`` out, as libvirt's test driver does)."""
        with self._errors("reading CPU times"):
            stats = self._conn.getAllDomainStats(
                libvirt.VIR_DOMAIN_STATS_CPU_TOTAL,
                libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
            )
            result = {}
            for dom, values in stats:
                if not dom.name().startswith(DOMAIN_PREFIX):
                    continue
                cpu = values.get("cpu.time")
                result[dom.UUIDString()] = int(cpu if cpu is not None else dom.info()[4])
            return result

    # -- registering a host --

    def host_check(self, *, storage_dir: str, base_images: list[str]) -> dict[str, str]:
        """What an operator registering this host should know, checked on the host: it
        answers, its storage directory can hold VMs (made if missing), and which base
        images it has. HypervisorError when it cannot hold VMs at all."""
        with self._errors("connecting"):
            version = self._conn.getLibVersion()
        self._pool_for(storage_dir, create=True)
        found = {"libvirt": f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"}
        for path in base_images:
            try:
                self._base_volume(path)
            except HypervisorError as error:
                found[path] = f"missing ({error})"
            else:
                found[path] = "present"
        return found

    # -- archives (labs/drivers/libvirt/archive.py) --

    def disk_export(self, spec: VmSpec, dest: str) -> None:
        """The shut-off VM's disk, flattened into a compressed standalone qcow2 at
        ``dest`` on this machine (the host's worker runs it, where the disk is)."""
        dom = self._own_domain(spec)
        if dom is None:
            raise DomainMissing(f"VM {spec.name} is not defined on host {self.host}")
        with self._errors(f"checking that {spec.name} is shut off"):
            if dom.isActive():
                raise HypervisorError(f"VM {spec.name} is still running: shut it down first")
        pool = self._pool_for(spec.storage_dir, create=False)
        with self._errors(f"finding the disk of {spec.name}"):
            archive.disk_export(self._conn, spec, pool, dest)

    def restore(
        self, spec: VmSpec, *, disk: str, seed_iso: bytes, progress: Progress | None = None
    ) -> None:
        """Make ``spec`` exist again with ``disk`` (a checked standalone qcow2 on this
        machine) as its disk, streamed into the host's pool; defined and started."""
        report = progress or (lambda _message: None)
        if self._own_domain(spec) is not None:
            raise HypervisorError(f"host {self.host} already has VM {spec.name}")
        pool = self._pool_for(spec.storage_dir, create=True)
        with self._errors(f"checking for an old disk of {spec.name}"):
            if self._volume(pool, spec.overlay_name) is not None:
                raise HypervisorError(
                    f"host {self.host} already has a disk {spec.overlay_name}: delete it first"
                )
        report("copying the archived disk")
        capacity = max(spec.disk_gib * GiB, qcow2_info(disk)["virtual-size"])
        with self._errors(f"copying the archived disk of {spec.name}"):
            volume = archive.disk_import(
                self._conn,
                pool,
                spec,
                disk,
                volume_xml=volume_xml(spec.overlay_name, capacity=capacity, fmt="qcow2"),
            )
        report("writing cloud-init seed")
        seed = self._write_seed(pool, spec, seed_iso)
        xml = build_domain_xml(
            spec, overlay_path=volume.path(), seed_path=seed.path(), standalone=True
        )
        with self._errors(f"defining VM {spec.name}"):
            dom = self._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        report("starting VM")
        self._start(dom)
        log.info("restored %s on %s from %s", spec.name, self.host, disk)

    # -- course images (labs/drivers/libvirt/images.py, labs/drivers/seal.py) --

    def image_capture(
        self, spec: VmSpec, dest: str, *, compress: bool, progress: Progress | None = None
    ) -> dict[str, float]:
        """The VM's disk, flattened and sealed, as a standalone qcow2 at ``dest`` here."""
        report = progress or (lambda _message: None)
        dom = self._own_domain(spec)
        if dom is None:
            raise DomainMissing(f"VM {spec.name} is not defined on host {self.host}")
        pool = self._pool_for(spec.storage_dir, create=False)
        with self._errors(f"finding the disk of {spec.name}"):
            volume = self._volume(pool, spec.overlay_name)
            if volume is None:
                raise HypervisorError(f"VM {spec.name} has no disk on host {self.host}")
            overlay, running = volume.path(), dom.isActive()
        if not os.path.isfile(overlay):
            raise HypervisorError(
                f"the disk {overlay} is not on this machine: a capture is made by the "
                "worker of the VM's host, where the disk is"
            )
        timings: dict[str, float] = {}
        started = time.monotonic()
        report("freezing the guest's file systems" if running else "copying the disk")
        with self._errors(f"capturing {spec.name}"):
            freeze = images.frozen(dom, timings=timings) if running else None
            sealed = seal.capture_file(overlay, dest, compress=compress, frozen=freeze)
        timings["total_s"] = time.monotonic() - started
        log.info("captured %s to %s (%s removed)", spec.name, dest, ", ".join(sealed.removed))
        return timings

    def image_put(self, source: str, path: str) -> None:
        """The local file ``source`` copied to ``path`` on this host (a new volume)."""
        directory, name = os.path.split(os.path.normpath(path))
        pool = self._pool_for(directory, create=True)
        with self._errors(f"copying image {name}"):
            if self._volume(pool, name) is not None:
                raise HypervisorError(f"host {self.host} has a file at {path} already")
            images.put(self._conn, pool, source, name)
        log.info("copied image %s to %s", path, self.host)

    def image_digest(self, path: str) -> str | None:
        """The sha256 of the file at ``path`` on this host; None when it is not there."""
        directory, name = os.path.split(os.path.normpath(path))
        try:
            pool = self._pool_for(directory, create=False)
        except HypervisorUnavailable:
            raise
        except HypervisorError:
            return None
        with self._errors(f"reading image {name}"):
            volume = self._volume(pool, name)
            return None if volume is None else images.digest(self._conn, volume)

    # -- moving between hosts --

    def copy_offline(
        self,
        to: LibvirtDriver,
        *,
        source: VmSpec,
        target: VmSpec,
        seed_iso: bytes,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        """The stopped VM, copied to host ``to`` (labs/drivers/libvirt/migration.py)."""
        return migration.copy_offline(
            self, to, source=source, target=target, seed_iso=seed_iso, progress=progress
        )

    def move_live(
        self,
        to: LibvirtDriver,
        *,
        source: VmSpec,
        target: VmSpec,
        seed_iso: bytes,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        """The running VM, migrated live to host ``to`` (labs/drivers/libvirt/migration.py)."""
        return migration.move_live(
            self, to, source=source, target=target, seed_iso=seed_iso, progress=progress
        )

    # -- console --

    def console(self, name: str) -> ConsoleEndpoint:
        """Where the running VM's VNC server listens, read from its live XML."""
        dom = self._domain(name)
        with self._errors(f"finding the console of VM {name}"):
            if not dom.isActive():
                raise DomainMissing(f"VM {name} is not running on host {self.host}")
            live = parse(dom.XMLDesc(0))
        graphics = live.find("./devices/graphics[@type='vnc']")
        if graphics is None:
            raise HypervisorError(f"VM {name} on host {self.host} has no VNC console")
        # libvirt starts QEMU with -name guest=<domain>, and QEMU's VNC server announces
        # "QEMU (<name>)" as its desktop name.
        desktop = f"QEMU ({name})"
        for listen in graphics.findall("listen"):
            if listen.get("type") == "socket" and listen.get("socket"):
                path = listen.get("socket", "")
                return ConsoleEndpoint(kind="unix", path=path, desktop_name=desktop)
        port = int(graphics.get("port", "-1"))
        if port <= 0:
            raise HypervisorError(f"VM {name} on host {self.host} has no VNC port yet")
        address = graphics.get("listen") or "127.0.0.1"
        for listen in graphics.findall("listen"):
            if listen.get("type") == "address" and listen.get("address"):
                address = listen.get("address", address)
        return ConsoleEndpoint(kind="tcp", host=address, port=port, desktop_name=desktop)


_UNDEFINE_BASIC = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)
_UNDEFINE_ALL = (
    _UNDEFINE_BASIC
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)
