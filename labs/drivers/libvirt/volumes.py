"""Block volumes on a libvirt host: standalone qcow2 files in the host's storage pool,
attached to a domain as virtio disks identified by their serial.

A running domain gets the disk hot-plugged (``attachDevice`` live: 0.04 s here, in the
guest within 2.5 s) and its definition updated; a shut-off one only its definition (the
definition is rewritten from its own XML, which libvirt's test driver can also do). A
detach asks the running guest to let the disk go and waits until the live XML no longer
has it (0.7 s measured). Every call is idempotent: what is done already is left alone.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET

import libvirt

from labs.drivers.base import HypervisorError, HypervisorUnavailable, VolumeSpec
from labs.drivers.libvirt.storage import GiB
from labs.drivers.libvirt.xml import (
    VOLUME_TARGETS,
    parse,
    volume_disk,
    volume_disk_xml,
    volume_xml,
)

log = logging.getLogger(__name__)

DETACH_POLL_SECONDS = 0.2
_DEFINITION = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def _disk_by_serial(domain: ET.Element, serial: str) -> ET.Element | None:
    for disk in domain.findall("./devices/disk"):
        if disk.findtext("serial") == serial:
            return disk
    return None


def _targets(*domains: ET.Element) -> set[str]:
    return {t.get("dev", "") for d in domains for t in d.findall("./devices/disk/target")}


class VolumesMixin:
    """The volume half of :class:`labs.drivers.libvirt.driver.LibvirtDriver`."""

    def volume_create(self, *, storage_dir: str, volume: VolumeSpec) -> float:
        """The volume's qcow2, empty and standing alone (no backing file); kept if it is
        there already (a retried create), refused if what is there has a backing file."""
        started = time.monotonic()
        pool = self._pool_for(storage_dir, create=True)
        with self._errors(f"creating volume {volume.file_name}"):
            existing = self._volume(pool, volume.file_name)
            if existing is None:
                xml = volume_xml(volume.file_name, capacity=volume.size_gib * GiB, fmt="qcow2")
                made = pool.createXML(xml, 0)
                log.info("created volume %s on %s", made.path(), self.host)
            else:
                backing = parse(existing.XMLDesc(0)).findtext("./backingStore/path")
                if backing:
                    raise HypervisorError(
                        f"volume {existing.path()} on host {self.host} has a backing file "
                        f"({backing}); a volume stands alone"
                    )
        return time.monotonic() - started

    def _volume_path(self, storage_dir: str, volume: VolumeSpec) -> str:
        pool = self._pool_for(storage_dir, create=False)
        with self._errors(f"finding volume {volume.file_name}"):
            found = self._volume(pool, volume.file_name)
            if found is None:
                raise HypervisorError(f"volume {volume.file_name} is missing on host {self.host}")
            return found.path()

    def _definition(self, dom: libvirt.virDomain) -> ET.Element:
        return parse(dom.XMLDesc(_DEFINITION))

    def _redefine(self, domain: ET.Element, doing: str) -> None:
        with self._errors(doing):
            self._conn.defineXMLFlags(
                ET.tostring(domain, encoding="unicode"), libvirt.VIR_DOMAIN_DEFINE_VALIDATE
            )

    def volume_attach(self, name: str, *, storage_dir: str, volume: VolumeSpec) -> float:
        """Attach the volume to the domain: hot-plugged when it runs, and in its
        definition either way (so a restart, a reset or a move keeps it)."""
        started = time.monotonic()
        dom = self._domain(name)
        path = self._volume_path(storage_dir, volume)
        with self._errors(f"attaching volume {volume.serial} to {name}"):
            active = bool(dom.isActive())
            definition = self._definition(dom)
            live = parse(dom.XMLDesc(0)) if active else definition
        in_definition = _disk_by_serial(definition, volume.serial) is not None
        in_live = _disk_by_serial(live, volume.serial) is not None
        free = [t for t in VOLUME_TARGETS if t not in _targets(definition, live)]
        if not free and not (in_definition and in_live):
            raise HypervisorError(f"VM {name} has no free disk slot on host {self.host}")
        if active and not in_live:
            target = free[0]
            with self._errors(f"hot-plugging volume {volume.serial} into {name}"):
                dom.attachDeviceFlags(
                    volume_disk_xml(volume, path=path, target=target),
                    libvirt.VIR_DOMAIN_AFFECT_LIVE,
                )
            live = parse(dom.XMLDesc(0))
        if not in_definition:
            # The target the running domain gave it, so that both agree; else the first free.
            disk = _disk_by_serial(live, volume.serial) if active else None
            target = disk.find("target").get("dev") if disk is not None else free[0]
            definition.find("devices").append(volume_disk(volume, path=path, target=target))
            self._redefine(definition, f"recording volume {volume.serial} in {name}")
        elapsed = time.monotonic() - started
        log.info("attached %s to %s on %s in %.2f s", volume.serial, name, self.host, elapsed)
        return elapsed

    def volume_detach(self, name: str, *, volume: VolumeSpec, timeout: float = 30) -> float:
        """Take the volume off the domain: out of the running guest (which is asked to let
        it go; waited for up to ``timeout`` seconds) and out of its definition."""
        started = time.monotonic()
        dom = self._domain_or_none(name)
        if dom is None:
            return 0.0  # no domain, nothing attached
        with self._errors(f"detaching volume {volume.serial} from {name}"):
            active = bool(dom.isActive())
            disk = _disk_by_serial(parse(dom.XMLDesc(0)), volume.serial) if active else None
            if disk is not None:
                dom.detachDeviceFlags(
                    ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE
                )
                deadline = time.monotonic() + timeout
                while _disk_by_serial(parse(dom.XMLDesc(0)), volume.serial) is not None:
                    if time.monotonic() >= deadline:
                        raise HypervisorError(
                            f"the guest of {name} did not let volume {volume.serial} go within "
                            f"{timeout:.0f} s; unmount it in the guest, or shut the VM down "
                            "and detach it then"
                        )
                    time.sleep(DETACH_POLL_SECONDS)
            definition = self._definition(dom)
        disk = _disk_by_serial(definition, volume.serial)
        if disk is not None:
            definition.find("devices").remove(disk)
            self._redefine(definition, f"removing volume {volume.serial} from {name}")
        elapsed = time.monotonic() - started
        log.info("detached %s from %s on %s in %.2f s", volume.serial, name, self.host, elapsed)
        return elapsed

    def volume_delete(self, *, storage_dir: str, volume: VolumeSpec) -> float:
        """Remove the volume's file; one already gone (or a storage directory that is not
        there) is fine."""
        started = time.monotonic()
        try:
            pool = self._pool_for(storage_dir, create=False)
        except HypervisorUnavailable:
            raise
        except HypervisorError as error:
            log.warning("no volume %s to delete on %s: %s", volume.file_name, self.host, error)
            return 0.0
        with self._errors(f"deleting volume {volume.file_name}"):
            found = self._volume(pool, volume.file_name)
            if found is not None:
                found.delete(0)
                log.info("deleted volume %s on %s", volume.file_name, self.host)
        return time.monotonic() - started

    def volume_serials(self, name: str) -> list[str]:
        """The serials of the disks in the domain's definition (its volumes)."""
        dom = self._domain(name)
        with self._errors(f"reading the disks of {name}"):
            definition = self._definition(dom)
        return [s for s in (d.findtext("serial") for d in definition.iter("disk")) if s]
