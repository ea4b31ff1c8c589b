"""Moving a VM to another libvirt host without shared storage: a stopped one copied (a
cold move, ``copy_offline``), a running one migrated live (``move_live``).

Everything goes through the two hosts' libvirt APIs, as provisioning does: the overlay
(with the internal snapshots it holds) is streamed from the source's volume into a new
volume on the destination, the seed is written there again, the domain is defined there
from the destination's spec, and each snapshot's metadata is redefined on it, parents
first, with the forwards (SSH's, published ports') and the storage paths of the
destination. Any failure removes
what was made on the destination and leaves the source as it was. The source is never
touched: the caller removes it once its rows say the VM is on the destination
(labs/compute/executors.py, ``move``), so that a crash at any point leaves one whole VM.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from contextlib import suppress
from urllib.parse import urlsplit

import libvirt

from labs.drivers.base import HypervisorError, Progress, VmSpec
from labs.drivers.libvirt.storage import StorageMixin
from labs.drivers.libvirt.xml import build_domain_xml, netdev_value, volume_xml, with_netdev

# Both ends are LibvirtDrivers (the storage half is what is used of them here); named by
# the mixin so this module does not import the driver that imports it.
LibvirtDriver = StorageMixin

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
REPORT_EVERY = 5  # percent of the copy between two progress reports


def volume_sha256(driver: LibvirtDriver, volume: libvirt.virStorageVol) -> str:
    """The SHA-256 of a volume's bytes, read through libvirt (a remote host's too)."""
    digest = hashlib.sha256()
    with driver._errors("reading a volume for its checksum"):
        stream = driver._conn.newStream(0)
        volume.download(stream, 0, 0, 0)
        try:
            while chunk := stream.recv(CHUNK):
                digest.update(chunk)
            stream.finish()
        except BaseException:
            with suppress(libvirt.libvirtError):
                stream.abort()
            raise
    return digest.hexdigest()


def _copy_volume(
    src: LibvirtDriver,
    volume: libvirt.virStorageVol,
    dst: LibvirtDriver,
    target: libvirt.virStorageVol,
    report: Progress,
) -> int:
    """Stream ``volume``'s bytes (its file, qcow2 header and all) into ``target``."""
    size = volume.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
    source = src._conn.newStream(0)
    sink = dst._conn.newStream(0)
    volume.download(source, 0, size, 0)
    target.upload(sink, 0, size, 0)
    copied, reported = 0, -REPORT_EVERY
    try:
        while chunk := source.recv(CHUNK):
            sink.send(chunk)
            copied += len(chunk)
            percent = copied * 100 // max(size, 1)
            if percent >= reported + REPORT_EVERY:
                report(f"copying the disk: {percent}% of {size / 2**20:.0f} MiB")
                reported = percent
        source.finish()
        sink.finish()
    except BaseException:
        for stream in (source, sink):
            with suppress(libvirt.libvirtError):
                stream.abort()
        raise
    if copied != size:
        raise HypervisorError(f"copied {copied} of {size} bytes of {volume.path()}")
    return copied


def _snapshots_parents_first(dom: libvirt.virDomain) -> list[libvirt.virDomainSnapshot]:
    snapshots = {s.getName(): s for s in dom.listAllSnapshots(0)}
    ordered, placed = [], set()

    def place(snapshot):
        if snapshot.getName() in placed:
            return
        with suppress(libvirt.libvirtError):  # a root has no parent: libvirt raises
            parent = snapshot.getParent(0)
            if parent.getName() in snapshots:
                place(snapshots[parent.getName()])
        placed.add(snapshot.getName())
        ordered.append(snapshot)

    for snapshot in snapshots.values():
        place(snapshot)
    return ordered


def _as_on_destination(xml: str, source: VmSpec, target: VmSpec) -> str:
    """A domain's XML (or a snapshot's, which holds one) as it reads on the destination:
    it forwards the destination's SSH port and published ports (its whole ``-netdev``
    from the destination's spec: a running domain's own XML lacks the ports published
    live) and names the destination's storage directory."""
    # Every copy of the domain the XML holds (a snapshot's <domain> and its
    # <inactiveDomain>) forwards the destination's SSH port; the first one, which
    # with_netdev rewrites, the published ports as well.
    old_forward = f"hostfwd=tcp:127.0.0.1:{source.ssh_port}-:"
    new_forward = f"hostfwd=tcp:127.0.0.1:{target.ssh_port}-:"
    xml = xml.replace(old_forward, new_forward)
    if target.network == "user":
        xml = with_netdev(xml, netdev_value(target.ssh_port, target.ports))
    return xml.replace(f"{source.storage_dir.rstrip('/')}/", f"{target.storage_dir.rstrip('/')}/")


def _same_base(src: LibvirtDriver, dst: LibvirtDriver, source: VmSpec, target: VmSpec):
    """The destination's base image volume, after checking its bytes are the source's."""
    src_base, dst_base = src._checked_base(source), dst._checked_base(target)
    if volume_sha256(src, src_base) != volume_sha256(dst, dst_base):
        raise HypervisorError(
            f"base image {target.base_image} on host {dst.host} differs from the one on host "
            f"{src.host}: copy the same image there first (sha256 must match)"
        )
    return dst_base


def _fresh_overlay(dst: LibvirtDriver, pool, target: VmSpec, *, like, base):
    """An empty overlay for ``target`` on the destination's ``base`` volume, as large as
    the source's overlay (``like``: its driver and volume); any older one of its name is
    removed. Every call on a volume goes through its host's error mapping: a host that
    died midway is "did not answer" (the move is tried again), never an internal error."""
    src, overlay = like
    with src._errors(f"reading the disk of {target.name}"):
        capacity = overlay.info()[1]
    with dst._errors(f"creating the disk of {target.name}"):
        backing = base.path()
        stale = dst._volume(pool, target.overlay_name)
        if stale is not None:
            stale.delete(0)
        return pool.createXML(
            volume_xml(target.overlay_name, capacity=capacity, fmt="qcow2", backing=backing), 0
        )


def _copy_block_volumes(src, src_pool, dst, pool, source: VmSpec, report: Progress) -> int:
    """The VM's block volumes, each streamed whole (file, qcow2 header and the internal
    snapshots it holds) into a fresh standalone volume of the same name and size beside
    the overlay on the destination; the serials stay (they are in the spec). Bytes."""
    copied = 0
    for volume in source.volumes:
        with src._errors(f"reading volume {volume.file_name}"):
            original = src._volume(src_pool, volume.file_name)
            if original is None:
                raise HypervisorError(f"volume {volume.file_name} is missing on host {src.host}")
            capacity = original.info()[1]
        with dst._errors(f"creating volume {volume.file_name}"):
            stale = dst._volume(pool, volume.file_name)
            if stale is not None:
                stale.delete(0)
            copy = pool.createXML(volume_xml(volume.file_name, capacity=capacity, fmt="qcow2"), 0)
        report(f"copying volume {volume.serial}")
        with src._errors(f"copying volume {volume.file_name}"):
            copied += _copy_volume(src, original, dst, copy, report)
    return copied


def copy_offline(
    src: LibvirtDriver,
    dst: LibvirtDriver,
    *,
    source: VmSpec,
    target: VmSpec,
    seed_iso: bytes,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Make the stopped VM ``source`` on ``src`` exist on ``dst`` as ``target`` (the same
    name and uuid; the destination's storage directory and SSH port). Returns timings."""
    report = progress or (lambda _message: None)
    started = time.monotonic()
    report("checking the VM is stopped")
    dom = src._own_domain(source)
    if dom is None:
        raise HypervisorError(f"VM {source.name} does not exist on host {src.host}")
    with src._errors(f"reading VM {source.name}"):
        if dom.isActive():
            raise HypervisorError(
                f"VM {source.name} is running on host {src.host}: shut it down first "
                "(a cold move takes a stopped VM)"
            )
        snapshots = [
            (s.getName(), s.getXMLDesc(0), s.isCurrent(0) == 1)
            for s in _snapshots_parents_first(dom)
        ]
        src_pool = src._pool_for(source.storage_dir, create=False)
        overlay = src._volume(src_pool, source.overlay_name)
    if overlay is None:
        raise HypervisorError(f"the disk of VM {source.name} is missing on host {src.host}")

    report(f"checking the base image on {dst.host}")
    dst_base = _same_base(src, dst, source, target)
    checked = time.monotonic()

    if dst._own_domain(target) is not None:  # an interrupted move's leftovers: start over
        log.info("removing the leftovers of an earlier move of %s on %s", target.name, dst.host)
        dst._remove(target)
    try:
        pool = dst._pool_for(target.storage_dir, create=True)
        copy = _fresh_overlay(dst, pool, target, like=(src, overlay), base=dst_base)
        with src._errors(f"copying the disk of {source.name}"):
            copied = _copy_volume(src, overlay, dst, copy, report)
        copied += _copy_block_volumes(src, src_pool, dst, pool, source, report)
        copied_at = time.monotonic()
        report("writing cloud-init seed")
        seed = dst._write_seed(pool, target, seed_iso)
        report(f"defining VM on {dst.host}")
        with dst._errors(f"defining VM {target.name}"):
            xml = build_domain_xml(target, overlay_path=copy.path(), seed_path=seed.path())
            moved = dst._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            for name, snapshot_xml, current in snapshots:
                report(f"redefining snapshot {name}")
                flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
                if current:
                    flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
                moved.snapshotCreateXML(_as_on_destination(snapshot_xml, source, target), flags)
            held = sorted(s.getName() for s in moved.listAllSnapshots(0))
        if held != sorted(name for name, _, _ in snapshots):
            raise HypervisorError(f"host {dst.host} holds snapshots {held} after the move")
    except BaseException:
        log.warning("moving %s to %s failed; removing what was made there", target.name, dst.host)
        with suppress(Exception):
            dst._remove(target)
        for volume in target.volumes:
            with suppress(Exception):
                dst.volume_delete(storage_dir=target.storage_dir, volume=volume)
        raise
    timings = {
        "checks_s": checked - started,
        "copy_s": copied_at - checked,
        "copied_mib": copied / 2**20,
        "total_s": time.monotonic() - started,
    }
    log.info(
        "copied %s from %s to %s: %.1f MiB in %.1f s (%.1f s in all), %d snapshots",
        source.name,
        src.host,
        dst.host,
        timings["copied_mib"],
        timings["copy_s"],
        timings["total_s"],
        len(snapshots),
    )
    return timings


LIVE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_INC  # the overlay goes along; the base is on both
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    | libvirt.VIR_MIGRATE_AUTO_CONVERGE  # a guest dirtying memory fast still converges
)
POLL_SECONDS = 0.5


def _migration_address(dst: LibvirtDriver) -> str | None:
    """Where the destination takes the memory and disk streams: its libvirt server's
    address (a URI with no server is this machine: libvirt's own choice)."""
    return urlsplit(dst.uri).hostname


def move_live(
    src: LibvirtDriver,
    dst: LibvirtDriver,
    *,
    source: VmSpec,
    target: VmSpec,
    seed_iso: bytes,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Move the running VM ``source`` on ``src`` to ``dst`` as ``target`` while it runs:
    an empty overlay on the same base and the seed are made there first, then libvirt
    copies the overlay's blocks and the memory (its pre-copy rounds), pauses the guest for
    the last round and resumes it there. On success the domain runs only on ``dst`` (the
    source's definition is gone; its volumes are left for the caller to delete). A
    failure leaves it running on ``src`` and removes what was made on ``dst``."""
    report = progress or (lambda _message: None)
    started = time.monotonic()
    report("checking the VM is running")
    dom = src._own_domain(source)
    if dom is None:
        raise HypervisorError(f"VM {source.name} does not exist on host {src.host}")
    with src._errors(f"reading VM {source.name}"):
        if not dom.isActive():
            raise HypervisorError(f"VM {source.name} is not running on host {src.host}")
        snapshots = dom.snapshotNum(0)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
        overlay = src._volume(src._pool_for(source.storage_dir, create=False), source.overlay_name)
    if source.volumes:
        raise HypervisorError(
            f"VM {source.name} has block volumes attached, which a live move does not take "
            "along: shut it down and move it stopped (its volumes come along)"
        )
    if snapshots:
        raise HypervisorError(
            f"VM {source.name} has {snapshots} snapshot{'s' if snapshots != 1 else ''}, which a "
            "live migration cannot take along (they live inside its disk): shut it down and "
            "move it stopped (every snapshot comes along), or delete them first"
        )
    if overlay is None:
        raise HypervisorError(f"the disk of VM {source.name} is missing on host {src.host}")
    report(f"checking the base image on {dst.host}")
    dst_base = _same_base(src, dst, source, target)
    if dst._own_domain(target) is not None:
        dst._remove(target)  # an interrupted move's leftovers: start over
    checked = time.monotonic()
    outcome: dict[str, object] = {}
    try:
        pool = dst._pool_for(target.storage_dir, create=True)
        _fresh_overlay(dst, pool, target, like=(src, overlay), base=dst_base)
        dst._write_seed(pool, target, seed_iso)
        params = {
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: _as_on_destination(xml, source, target),
            libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],
        }
        address = _migration_address(dst)
        if address:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{address}"
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{address}"

        def migrate():
            try:
                outcome["domain"] = dom.migrate3(dst._conn, params, LIVE_FLAGS)
            except BaseException as error:  # handed to the waiting thread
                outcome["error"] = error

        report("copying the disk and memory")
        worker = threading.Thread(target=migrate, name=f"migrate-{source.name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            with suppress(libvirt.libvirtError):
                stats = dom.jobStats(0)
                report(_progress_text(stats))
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, libvirt.libvirtError):
                with src._errors(f"migrating VM {source.name} to host {dst.host}"):
                    raise error
            raise error
    except BaseException:
        if _still_on(src, source):
            log.warning(
                "live move of %s to %s failed; removing what was made there",
                target.name,
                dst.host,
            )
            with suppress(Exception):
                dst._remove(target)
        else:
            # The migration got far enough that the source no longer has the domain: the
            # destination's copy is the VM now, never to be removed here (a retry of the
            # move finds it there and records it).
            log.error("live move of %s to %s failed after the switch", target.name, dst.host)
        raise
    moved = outcome["domain"]
    done = time.monotonic()
    timings = {
        "checks_s": checked - started,
        "migrate_s": done - checked,
        "total_s": done - started,
    }
    with suppress(libvirt.libvirtError):
        completed = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if "downtime" in completed:
            timings["downtime_ms"] = float(completed["downtime"])
        if "memory_iteration" in completed:
            timings["memory_iterations"] = float(completed["memory_iteration"])
    log.info("live-moved %s from %s to %s: %s", source.name, src.host, dst.host, timings)
    return timings


def _still_on(driver: LibvirtDriver, spec: VmSpec) -> bool:
    """Whether the source still holds the domain; False when it cannot tell, so that the
    destination's copy, which may be the only one, is kept."""
    try:
        return driver._own_domain(spec) is not None
    except Exception:  # noqa: BLE001 - unknown: the safe answer keeps the destination
        return False


def _progress_text(stats: dict) -> str:
    """What a migration job is doing, for the VM's page."""
    total = stats.get("memory_total") or 0
    remaining = stats.get("memory_remaining") or 0
    disk_total = stats.get("disk_total") or 0
    disk_remaining = stats.get("disk_remaining") or 0
    if disk_total and disk_remaining:
        done = 100 - disk_remaining * 100 // disk_total
        return f"copying the disk: {done}% of {disk_total / 2**20:.0f} MiB"
    if total:
        done = 100 - remaining * 100 // total
        iteration = stats.get("memory_iteration", 0)
        return f"copying memory: {done}% of {total / 2**20:.0f} MiB (round {iteration})"
    return "copying the disk and memory"
