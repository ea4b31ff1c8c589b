"""Storage on a libvirt host: dir pools found by path, overlays on a read-only base, seeds.

Overlays and seeds live in a libvirt dir pool on the host's storage directory (made on
first use); the base image is a volume of whichever pool holds its directory. Everything
goes through libvirt's storage API, so a remote host needs nothing but its libvirtd.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import suppress

import libvirt

from labs.drivers.base import DOMAIN_PREFIX, HypervisorError, HypervisorUnavailable, VmSpec
from labs.drivers.libvirt.errors import error_code, is_transient
from labs.drivers.libvirt.xml import parse, pool_xml, volume_xml

log = logging.getLogger(__name__)

GiB = 1024**3
UPLOAD_CHUNK = 256 * 1024
FILE_CHUNK = 1024 * 1024


def volume_upload(conn: libvirt.virConnect, volume: libvirt.virStorageVol, data: bytes) -> None:
    """Write ``data`` into ``volume`` through a libvirt stream (works on remote hosts too)."""
    stream = conn.newStream(0)
    volume.upload(stream, 0, len(data), 0)
    try:
        for offset in range(0, len(data), UPLOAD_CHUNK):
            stream.send(data[offset : offset + UPLOAD_CHUNK])
        stream.finish()
    except BaseException:
        with suppress(libvirt.libvirtError):
            stream.abort()
        raise


def volume_from_file(
    conn: libvirt.virConnect, pool: libvirt.virStoragePool, xml: str, source: str
) -> libvirt.virStorageVol:
    """A new volume (``xml``) in ``pool`` holding the bytes of the local file ``source``,
    streamed through libvirt a MiB at a time (works on remote hosts too); on any failure
    the half-written volume is deleted."""
    size = os.path.getsize(source)
    volume = pool.createXML(xml, 0)
    stream = conn.newStream(0)
    try:
        volume.upload(stream, 0, size, 0)
        with open(source, "rb") as f:
            while chunk := f.read(FILE_CHUNK):
                stream.send(chunk)
        stream.finish()
    except BaseException:
        with suppress(libvirt.libvirtError):
            stream.abort()
        with suppress(libvirt.libvirtError):
            volume.delete(0)
        raise
    return volume


class StorageMixin:
    """The storage half of :class:`labs.drivers.libvirt.driver.LibvirtDriver`."""

    host: str
    uri: str

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
                    pool = self._conn.storagePoolDefineXML(pool_xml(name, path), 0)
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
            target = parse(pool.XMLDesc(0)).findtext("./target/path")
            if target and os.path.normpath(target) == path:
                return pool
        return None

    def _volume(self, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        """The volume ``name`` in ``pool``, or None; refreshes once for files made outside."""
        for attempt in range(2):
            try:
                return pool.storageVolLookupByName(name)
            except libvirt.libvirtError as error:
                if error_code(error) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            if attempt == 0:
                try:
                    pool.refresh(0)
                except libvirt.libvirtError as error:  # e.g. another worker's upload runs
                    if is_transient(error):
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
                xml = volume_xml(
                    spec.overlay_name,
                    capacity=spec.disk_gib * GiB,
                    fmt="qcow2",
                    backing=base_path,
                )
                volume = pool.createXML(xml, 0)
                log.info("created overlay %s on %s", volume.path(), base_path)
                return volume
        backing = parse(volume.XMLDesc(0)).findtext("./backingStore/path")
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
                volume_xml(spec.seed_name, capacity=len(seed_iso), fmt="raw"), 0
            )
            self._upload(volume, seed_iso)
            return volume

    def _upload(self, volume: libvirt.virStorageVol, data: bytes) -> None:
        volume_upload(self._conn, volume, data)

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
