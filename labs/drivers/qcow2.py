"""Reading qcow2 files Stratus did not make, safely (LIBVIRT-NOTES, "hostile uploads").

``qemu-img info`` with the format given (never probed) and without ``--backing-chain``
(which would open the named backing file), under ``prlimit``; an image that names a
backing file or an external data file is refused: either would make QEMU read a file of
the host's choosing. No libvirt here: the archive's checks run wherever the file is.
"""

import hashlib
import json
import subprocess

from labs.drivers.base import HypervisorError

CHUNK = 1024 * 1024
QEMU_IMG = "qemu-img"
# qemu-img info parses an untrusted header: bound what it may use.
INFO_LIMITS = ["prlimit", "--as=1073741824", "--cpu=30", "--"]


class ImageRefused(HypervisorError):
    """An image Stratus will not use as a VM's disk (a backing file, a data file, ...)."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def qcow2_info(path: str) -> dict:
    """``qemu-img info`` of ``path`` read as qcow2 (never probed, never its chain opened)."""
    result = subprocess.run(  # noqa: S603 (a fixed argv; the path is one argument)
        [*INFO_LIMITS, QEMU_IMG, "info", "--output=json", "-f", "qcow2", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise ImageRefused(f"{path} is not a readable qcow2 image: {result.stderr.strip()}")
    return json.loads(result.stdout)


def standalone_check(path: str) -> dict:
    """The info of a qcow2 that stands alone; ImageRefused for a backing or data file."""
    info = qcow2_info(path)
    if info.get("format") != "qcow2":
        raise ImageRefused(f"{path} is not a qcow2 image")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRefused(
            f"{path} names a backing file ({info.get('backing-filename')}): refused, an "
            "archive stands alone"
        )
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file"):
        raise ImageRefused(f"{path} names an external data file: refused")
    return info
