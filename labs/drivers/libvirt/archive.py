"""A VM's disk out of and back into a host: the end of term's archive, restore_archive.

**Export runs where the disk is.** The disk is a qcow2 overlay on the host's base image;
a standalone archive needs the two flattened into one, which ``qemu-img convert -c``
does from the files themselves. A host's operations run on its own worker
(``host.<name>`` queue, docs/hypervisor.md), which is on the host, so the worker reads
the overlay (and through it the base image) from the paths libvirt reports and writes
the archive to ``STRATUS_ARCHIVE_DIR`` on that machine (a local disk, or a share every
host mounts). A worker that cannot see the disk's file refuses, permanently, and the VM
is left as it was. (Streaming the overlay out through libvirt and flattening it
elsewhere would need the same base image there too: no simpler, and twice the bytes.)

**Import works on any host**: the standalone qcow2 is streamed into the host's pool
through libvirt's storage API (like a cold move), so ``restore_archive`` can run on the
web machine with the archive disk.

Images are checked before use (docs/security.md, LIBVIRT-NOTES "hostile uploads"): no
backing file, no external data file, format given with ``-f``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import suppress

import libvirt

from labs.drivers.base import HypervisorError, VmSpec
from labs.drivers.libvirt.storage import volume_from_file

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
QEMU_IMG = "qemu-img"


def disk_export(conn: libvirt.virConnect, spec: VmSpec, pool, dest: str) -> None:
    """Flatten ``spec``'s overlay (and its base) into a compressed standalone qcow2 at
    ``dest``; the domain must be shut off. A partial ``dest`` is removed on failure."""
    volume = pool.storageVolLookupByName(spec.overlay_name)
    source = volume.path()
    if not os.path.isfile(source):
        raise HypervisorError(
            f"the disk {source} is not on this machine: an archive is written by the "
            "worker of the VM's host, where the disk is"
        )
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        # -f qcow2 for the overlay; its backing (the base image, made by Stratus) is
        # read to flatten the chain. No -B: the output has no backing file.
        subprocess.run(  # noqa: S603 (a fixed argv of paths libvirt reports)
            [QEMU_IMG, "convert", "-c", "-f", "qcow2", "-O", "qcow2", source, dest],
            capture_output=True,
            text=True,
            check=True,
            timeout=6 * 3600,
        )
    except subprocess.CalledProcessError as error:
        with suppress(FileNotFoundError):
            os.unlink(dest)
        raise HypervisorError(
            f"qemu-img convert of {source} failed: {error.stderr.strip()}"
        ) from error
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(dest)
        raise
    log.info("exported %s to %s", source, dest)


def disk_import(
    conn: libvirt.virConnect, pool, spec: VmSpec, source: str, *, volume_xml: str
) -> libvirt.virStorageVol:
    """A new volume ``spec.overlay_name`` in ``pool`` holding the bytes of ``source``
    (a checked standalone qcow2), streamed through libvirt."""
    return volume_from_file(conn, pool, volume_xml, source)
