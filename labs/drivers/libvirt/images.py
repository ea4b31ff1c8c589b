"""Course images on a libvirt host: a VM's disk captured, image files copied and checked.

**Capture runs where the disk is** (like an archive, labs/drivers/libvirt/archive.py): the
host's worker reads the overlay and its base from the paths libvirt reports and writes the
sealed image (labs/drivers/seal.py) into ``STRATUS_IMAGE_DIR`` on that machine. A running
guest's file systems are frozen through its agent (``fsFreeze``) for the first copy only,
then thawed whatever happens; a guest whose agent does not freeze is refused, not copied
half-written.

**Copies and checksums go through libvirt's storage API**, so they work on a remote host:
an image file on this machine is streamed into a volume at the same path on the host (a
dir pool on its directory), and the host's file is streamed back to be checksummed; a
different file already at that path is never overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager, suppress

import libvirt

from labs.drivers.base import HypervisorError, HypervisorUnavailable
from labs.drivers.libvirt.storage import volume_from_file
from labs.drivers.libvirt.xml import parse, sub, volume_xml

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


@contextmanager
def frozen(dom: libvirt.virDomain, *, timings: dict[str, float]):
    """The guest's file systems frozen (its agent flushes them) while the block runs."""
    try:
        dom.fsFreeze(None, 0)
    except libvirt.libvirtError as error:
        raise HypervisorUnavailable(
            f"the guest agent of {dom.name()} did not freeze its file systems "
            f"({(error.get_error_message() or str(error)).strip()}); try again once the "
            "VM has booted, or shut it down and capture it stopped"
        ) from None
    started = time.monotonic()
    try:
        yield
    finally:
        try:
            dom.fsThaw(None, 0)
        except libvirt.libvirtError as error:  # the guest stays frozen: say so loudly
            log.error("could not thaw %s: %s", dom.name(), error)
            what = f"the file systems of {dom.name()} could not be thawed"
            raise HypervisorError(what) from None
        timings["frozen_s"] = time.monotonic() - started


def put(conn: libvirt.virConnect, pool: libvirt.virStoragePool, source: str, name: str):
    """A new volume ``name`` in ``pool`` holding the bytes of the local file ``source``."""
    xml = parse(volume_xml(name, capacity=os.path.getsize(source), fmt="raw"))
    sub(sub(xml.find("target"), "permissions"), "mode", "0444")  # a base is read-only
    return volume_from_file(conn, pool, ET.tostring(xml, encoding="unicode"), source)


def digest(conn: libvirt.virConnect, volume: libvirt.virStorageVol) -> str:
    """The sha256 of a volume's bytes, streamed from its host."""
    sha = hashlib.sha256()
    stream = conn.newStream(0)
    volume.download(stream, 0, 0, 0)
    try:
        while True:
            chunk = stream.recv(CHUNK)
            if isinstance(chunk, int):  # -2: would block (not with a blocking stream)
                continue
            if not chunk:
                break
            sha.update(chunk)
        stream.finish()
    except BaseException:
        with suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return sha.hexdigest()
