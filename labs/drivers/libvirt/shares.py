"""Shared directories on a libvirt host: what a domain's virtiofs shares need on the host
before it starts (labs/compute/shares.py decides which shares a VM has; xml.py writes the
``<filesystem>`` elements).

libvirt starts one virtiofsd per share (as root, ``/usr/lib/qemu/virtiofsd`` from
qemu-system-common on Debian 12), which passes uids through: what guest uid 1000 writes is
owned by uid 1000 on the host, and guest root acts as host root inside the share. Hence:

- every share's directory exists before the domain starts (libvirt refuses to start it
  otherwise), a group share's one writable by every guest account (mode 0777: the guest
  accounts of a group have uids 1000, 1001, ..., which mean nothing on the host); the
  shares' root directory is 0700, so no host account reaches into it;
- a read-only share (the course share) cannot rely on the guest's ``ro`` mount, which a
  guest root undoes with a remount, nor on host permissions, which root ignores: libvirt
  9.0 refuses virtiofs ``<readonly/>`` ("virtiofs does not yet support read-only mode")
  and this virtiofsd has no read-only option. Its source is a read-only *bind mount* of
  the files directory beside it (``<course>/ro`` of ``<course>/files``), made here: the
  host kernel answers EROFS to every write, root's too. Making it needs root on the host
  (the worker of a hypervisor host runs as root, as libvirtd does); a worker that cannot
  make it refuses to start the domain, saying so, rather than export it writable.

The bind mounts live until the host reboots; the next start of any VM with the share
makes it again. The test driver (``test:///``) runs no virtiofsd: nothing is prepared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import xml.etree.ElementTree as ET

from labs.drivers.base import HypervisorError
from labs.drivers.libvirt.xml import SHARE_ALIAS, SHARE_ALIAS_RO

log = logging.getLogger(__name__)

GROUP_SHARE_MODE = 0o777
READONLY_ORIGIN = "files"  # the read-only share's source is a bind of this sibling
MOUNT = "/usr/bin/mount"


def domain_shares(domain: ET.Element) -> list[tuple[str, str, bool]]:
    """(tag, source directory, read-only) of each virtiofs share in a domain's XML."""
    found = []
    for fs in domain.findall("./devices/filesystem"):
        driver = fs.find("driver")
        if driver is None or driver.get("type") != "virtiofs":
            continue
        alias = fs.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        source = fs.find("source")
        target = fs.find("target")
        if source is None or target is None or not name.startswith(SHARE_ALIAS):
            continue
        readonly = name.startswith(SHARE_ALIAS_RO)
        found.append((target.get("dir", ""), source.get("dir", ""), readonly))
    return found


def _directory(path: str, mode: int) -> None:
    """``path`` as a real directory (not a symlink) with ``mode``; its parents made 0700."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    if os.path.islink(path) or not os.path.isdir(path):
        raise HypervisorError(f"share directory {path} is not a directory (a symlink?)")
    os.chmod(path, mode, follow_symlinks=False)


MOUNTINFO = "/proc/self/mountinfo"


def _mount_options(path: str) -> set[str] | None:
    """The per-mount options of the mount at ``path`` (the topmost), None if none is:
    /proc/self/mountinfo, because a bind mount within one filesystem is invisible to
    ``os.path.ismount`` (same device)."""
    found = None
    with open(MOUNTINFO, encoding="utf-8") as info:
        for line in info:
            fields = line.split(" ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == path:
                found = set(fields[5].split(","))
    return found


def _readonly(path: str) -> bool:
    options = _mount_options(path)
    return options is not None and "ro" in options


def _mount(*args: str) -> None:
    # Shell-free, fixed binary; the paths are the shares' own (ShareSpec-checked).
    result = subprocess.run(  # noqa: S603
        [MOUNT, *args], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        why = result.stderr.strip() or "mount failed"
        raise HypervisorError(
            f"cannot make the read-only share {args[-1]} ({why}); the host's worker must "
            "run as root to bind it read-only (docs/storage.md)"
        )


def readonly_bind(source: str) -> None:
    """Make ``source`` a read-only bind mount of its sibling ``files`` directory."""
    origin = os.path.join(os.path.dirname(source), READONLY_ORIGIN)
    _directory(origin, 0o755)
    if _readonly(source):
        return
    _directory(source, 0o755)
    if _mount_options(source) is None:
        _mount("--bind", origin, source)
    _mount("-o", "remount,bind,ro,nosuid,nodev,noexec", source)
    if not _readonly(source):
        raise HypervisorError(f"share {source} is still writable after its read-only bind")
    log.info("course share %s is a read-only bind of %s", source, origin)


def shares_prepare(domain: ET.Element) -> None:
    """Everything the domain's shares need on this host before it starts."""
    for tag, source, readonly in domain_shares(domain):
        if not os.path.isabs(source) or os.path.normpath(source) != source:
            raise HypervisorError(f"share {tag} has a source that is not an absolute path")
        if readonly:
            readonly_bind(source)
        else:
            _directory(source, GROUP_SHARE_MODE)
