"""Reading qcow2 files Stratus did not make, safely (LIBVIRT-NOTES, "hostile uploads").

``qemu-img info`` with the format given (never probed) and without ``--backing-chain``
(which would open the named backing file), under ``prlimit``; an image that names a
backing file or an external data file is refused: either would make QEMU read a file of
the host's choosing. No libvirt here: the archive's and the import's checks run wherever
the file is.

An import (``upload_check`` then ``standalone_copy``) adds: the virtual size within a
limit, ``qemu-img check`` clean, and the copy made by ``qemu-img convert`` from a
``json:`` source whose backing is cut off (``"backing": null``), so even a check that
missed something could not pull another file into the copy.
"""

import hashlib
import json
import os
import subprocess
from contextlib import suppress

from labs.drivers.base import HypervisorError

CHUNK = 1024 * 1024
QEMU_IMG = "qemu-img"
# qemu-img parses an untrusted header: bound what it may use.
INFO_LIMITS = ["prlimit", "--as=1073741824", "--cpu=30", "--"]
# A check or a copy reads the whole image: more CPU time, the same memory bound.
COPY_LIMITS = ["prlimit", "--as=2147483648", "--cpu=3600", "--"]
QCOW2_MAGIC = b"QFI\xfb"
GiB = 1024**3


class ImageRefused(HypervisorError):
    """An image Stratus will not use as a VM's disk (a backing file, a data file, ...)."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _qemu_img(limits: list[str], args: list[str], *, timeout: float):
    return subprocess.run(  # noqa: S603 (a fixed argv; the path is one argument)
        [*limits, QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:300]


def qcow2_info(path: str) -> dict:
    """``qemu-img info`` of ``path`` read as qcow2 (never probed, never its chain opened)."""
    result = _qemu_img(INFO_LIMITS, ["info", "--output=json", "-f", "qcow2", path], timeout=60)
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
            "image must stand alone"
        )
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file"):
        raise ImageRefused(f"{path} names an external data file ({data['data-file']}): refused")
    return info


def upload_check(path: str, *, max_virtual_gib: int) -> dict:
    """Everything an import checks before a byte is copied, in the order that costs least:
    a regular file, the qcow2 magic, ``qemu-img info -f qcow2`` (standalone: no backing
    file, no data file), the virtual size within ``max_virtual_gib``, ``qemu-img check``
    clean. Returns the info; ImageRefused naming the reason otherwise."""
    if not os.path.isfile(path) or os.path.islink(path):
        raise ImageRefused(f"{path} is not a regular file")
    with open(path, "rb") as f:
        if f.read(4) != QCOW2_MAGIC:
            raise ImageRefused(
                f"{path} is not a qcow2 image (no qcow2 header: a raw disk or another format; "
                "convert it with qemu-img convert -O qcow2 first)"
            )
    info = standalone_check(path)
    size = int(info.get("virtual-size", 0))
    if not 0 < size <= max_virtual_gib * GiB:
        raise ImageRefused(
            f"{path} has a virtual size of {size / GiB:.1f} GiB; the limit is "
            f"{max_virtual_gib} GiB (IMAGE_MAX_VIRTUAL_GIB)"
        )
    check = _qemu_img(COPY_LIMITS, ["check", "--output=json", "-f", "qcow2", path], timeout=3600)
    # 0: clean; 1: not checked (an error); 2: corruptions; 3: leaked clusters only.
    if check.returncode == 3:
        pass  # leaked clusters waste space, lose nothing; the copy leaves them behind
    elif check.returncode != 0:
        detail = _first_line(check.stderr) or _first_line(check.stdout)
        raise ImageRefused(f"{path} failed qemu-img check ({detail or 'corrupt'})")
    return info


def _cut_off(path: str) -> str:
    """A ``json:`` source that opens ``path`` as qcow2 with its backing cut off."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": path}}
    return "json:" + json.dumps(spec)


def standalone_copy(source: str, dest: str, *, compress: bool = False) -> None:
    """Copy a checked qcow2 into ``dest`` as a new standalone qcow2 (backing cut off,
    under prlimit); ``dest`` must not exist. A partial copy is removed on failure."""
    if os.path.lexists(dest):
        raise ImageRefused(f"{dest} exists already: not overwritten")
    args = ["convert", "-O", "qcow2", *(["-c"] if compress else []), _cut_off(source), dest]
    try:
        result = _qemu_img(COPY_LIMITS, args, timeout=6 * 3600)
        if result.returncode != 0:
            raise ImageRefused(f"copying {source} failed: {_first_line(result.stderr)}")
        standalone_check(dest)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(dest)
        raise
