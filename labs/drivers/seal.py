"""A VM's disk made into a course image: flattened, its identity taken out (no libvirt).

A capture is the source VM's overlay and base flattened into one standalone disk. As it
comes, that disk carries the source guest's identity: its SSH host keys (every VM booted
from it would present the same key, and its private half would sit in the image), its
machine-id and the authorized_keys of the source's accounts (whoever held them could log
into every VM made from it). ``seal`` takes those out of the disk file itself, before it
is ever booted: ``debugfs -w`` on the ext2/3/4 root file system, found through the
partition table (``sfdisk --json``) and ``?offset=`` (no loop device, no mount, no
libguestfs). The base image's ``stratus-ssh-hostkeys.service`` makes new host keys for
missing ones on first boot, systemd a new machine-id for an empty one, and cloud-init
gives the new VM's group its own key.

A disk whose root is not ext2/3/4 (no ``/etc/ssh`` found on any ext partition) cannot be
sealed and the capture is refused: better no image than one that clones an identity.
docs/storage.md, "Capture".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from contextlib import suppress
from dataclasses import dataclass

from labs.drivers.base import HypervisorError

QEMU_IMG = "qemu-img"
EXT_MAGIC_AT = 1024 + 56  # the superblock's s_magic, from the start of the file system
EXT_MAGIC = b"\x53\xef"
SECTOR = 512
TIMEOUT = 600


class SealError(HypervisorError):
    """The disk's identity could not be taken out: the capture is not registered."""


@dataclass(frozen=True)
class Sealed:
    offset: int  # where the root file system starts in the disk (bytes)
    removed: tuple[str, ...]  # what was taken out (paths inside the guest)


def _run(args: list[str], *, stdin: str | None = None, ok=(0,)) -> subprocess.CompletedProcess:
    result = subprocess.run(  # noqa: S603 (a fixed argv; paths are single arguments)
        args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if result.returncode not in ok:
        tail = (result.stderr or result.stdout).strip()[-300:]
        raise SealError(f"{args[0]} failed ({result.returncode}): {tail}")
    return result


def flatten(source: str, dest: str, *, fmt: str, compress: bool = False) -> None:
    """``source`` (a qcow2 Stratus made: an overlay on its base image) and its chain, as
    one standalone image of format ``fmt`` at ``dest``. ``-U``: the VM may be running
    (its file systems frozen by the caller); the lock is QEMU's, not a security check."""
    args = [QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", fmt, source, dest]
    if compress:
        args.insert(2, "-c")
    try:
        _run(args)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(dest)
        raise


def _partition_offsets(raw: str) -> list[int]:
    """Where each partition starts (bytes), or [0] for a disk without a partition table."""
    result = _run(["sfdisk", "--json", raw], ok=(0, 1))
    if result.returncode != 0 or not result.stdout.strip():
        return [0]
    table = json.loads(result.stdout).get("partitiontable", {})
    size = int(table.get("sectorsize", SECTOR))
    return [int(p["start"]) * size for p in table.get("partitions", [])] or [0]


def _is_ext(raw: str, offset: int) -> bool:
    with open(raw, "rb") as f:
        f.seek(offset + EXT_MAGIC_AT)
        return f.read(2) == EXT_MAGIC


def _fs(raw: str, offset: int) -> str:
    return f"{raw}?offset={offset}"


def _listing(fs: str, directory: str) -> dict[str, str]:
    """``debugfs ls -p``: {name: mode (octal text)} of ``directory``; {} when missing."""
    out = _run(["debugfs", "-R", f"ls -p {directory}", fs]).stdout
    entries = {}
    for line in out.splitlines():
        parts = line.split("/")  # /inode/mode/uid/gid/name/size/
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            entries[parts[5]] = parts[2]
    return entries


def _root_offset(raw: str) -> int:
    for offset in _partition_offsets(raw):
        if _is_ext(raw, offset) and _listing(_fs(raw, offset), "/etc/ssh"):
            return offset
    raise SealError(
        "no ext2/3/4 root file system with /etc/ssh on the disk: its SSH host keys cannot "
        "be taken out, so it is not captured"
    )


def _regular(mode: str) -> bool:
    return mode.startswith("100")


def _directory(mode: str) -> bool:
    return mode.lstrip("0").startswith("4")


def seal(raw: str) -> Sealed:
    """Take the guest's identity out of the raw disk image ``raw`` (edited in place): SSH
    host keys removed, machine-id emptied, every authorized_keys of root and of the
    accounts under /home removed. Checked afterwards; SealError when any is left."""
    offset = _root_offset(raw)
    fs = _fs(raw, offset)
    features = _run(["dumpe2fs", "-h", fs], ok=(0, 1)).stdout
    if "needs_recovery" in features:  # replay the journal first, or it undoes the edit
        _run(["e2fsck", "-E", "journal_only", "-p", fs], ok=(0, 1))
    commands, removed = [], []
    for name, mode in _listing(fs, "/etc/ssh").items():
        if name.startswith("ssh_host_") and _regular(mode):
            commands.append(f"rm /etc/ssh/{name}")
            removed.append(f"/etc/ssh/{name}")
    homes = [f"/home/{n}" for n, mode in _listing(fs, "/home").items() if _directory(mode)]
    for home in ["/root", *homes]:
        if _regular(_listing(fs, f"{home}/.ssh").get("authorized_keys", "")):
            commands.append(f"rm {home}/.ssh/authorized_keys")
            removed.append(f"{home}/.ssh/authorized_keys")
    dbus = _listing(fs, "/var/lib/dbus").get("machine-id", "")
    if _regular(dbus):
        commands.append("rm /var/lib/dbus/machine-id")
        removed.append("/var/lib/dbus/machine-id")
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty")
        open(empty, "wb").close()
        if "machine-id" in _listing(fs, "/etc"):
            commands += ["cd /etc", "rm machine-id"]
        commands += [
            "cd /etc",
            f"write {empty} machine-id",
            "sif machine-id mode 0100444",
            "sif machine-id uid 0",
            "sif machine-id gid 0",
        ]
        removed.append("/etc/machine-id (emptied)")
        _run(["debugfs", "-w", "-f", "-", fs], stdin="\n".join(commands) + "\n")
    _verify(fs)
    return Sealed(offset=offset, removed=tuple(removed))


def _verify(fs: str) -> None:
    left = [n for n in _listing(fs, "/etc/ssh") if n.startswith("ssh_host_")]
    stat = _run(["debugfs", "-R", "stat /etc/machine-id", fs]).stdout
    size = re.search(r"\bSize: (\d+)", stat)
    if left or size is None or size.group(1) != "0":
        raise SealError(f"the disk still holds {', '.join(left) or 'its machine-id'}")
    _run(["e2fsck", "-n", "-f", fs], ok=(0,))


def capture_file(overlay: str, dest: str, *, compress: bool, frozen=None) -> Sealed:
    """``overlay`` flattened, sealed and written to ``dest`` as a standalone qcow2.

    ``frozen`` (a context manager or None) is held only while the overlay is read: the
    running guest's file systems stay frozen for the first copy and no longer. The raw
    intermediate file sits beside ``dest`` and is removed whatever happens.
    """
    raw = f"{dest}.raw"
    try:
        if frozen is None:
            flatten(overlay, raw, fmt="raw")
        else:
            with frozen:
                flatten(overlay, raw, fmt="raw")
        sealed = seal(raw)
        args = [QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, dest]
        if compress:
            args.insert(2, "-c")
        try:
            _run(args)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(dest)
            raise
        return sealed
    finally:
        with suppress(FileNotFoundError):
            os.unlink(raw)
