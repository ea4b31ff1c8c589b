"""Shared files: a group share and a course share in every VM of a course that has them.

A course with ``Course.shares`` on gives every VM it makes or resets from then on two
virtiofs shares (Vm.shares records that its domain has them):

- the **group share**, ``<STRATUS_SHARES_DIR>/group-<id>``, mounted read-write at
  ``/srv/group`` in every VM of the group: what one VM writes, the others read at once;
- the **course share**, ``<STRATUS_SHARES_DIR>/course-<id>/files``, exported read-only
  (``course-<id>/ro``, a read-only bind of ``files``: labs/drivers/libvirt/shares.py) and
  mounted at ``/srv/course``; instructors put files there from the admin or with
  ``manage.py course_share_put`` (:func:`course_share_put`).

Both are mounted ``nosuid,nodev,noexec`` by cloud-init (labs/drivers/cloudinit.py). The
shares root is one path on every host and on the admin's machine (a shared filesystem in
production: docs/storage.md), so a group's VMs on two hosts see one directory.

What virtiofs costs: QEMU cannot migrate or save a domain with a vhost-user-fs device.
A VM with shares is never suspended to disk nor moved live (refused, naming the reason;
labs/compute/kinds.py and moves.py) nor snapshotted while it runs (that saves its memory);
the clock shuts it down where it would have saved it (:func:`save_kind`), and the deadline
shuts it down before its final, disk-only snapshot (labs/compute/term.py).

Quota: the group share's size (its blocks, as du counts them, measured whenever the quota
is read) counts against the group's disk quota; the course share counts against no group,
and holds at most COURSE_SHARE_CAP_MIB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from typing import BinaryIO

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from labs import access
from labs.access import Action
from labs.choices import OperationKind
from labs.drivers.base import ShareSpec
from labs.errors import Invalid, NotAllowed, Refused
from labs.models import Course, Group, Vm

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
GROUP_TAG, GROUP_PATH = "group", "/srv/group"
COURSE_TAG, COURSE_PATH = "course", "/srv/course"
FILE_NAME_MAX = 128
# A plain file name: no path, no leading dot (no hidden files, no "." or ".."), no spaces.
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
CHUNK = 1024 * 1024
_TEMP_PREFIX = ".put-"


# --- where they are ---------------------------------------------------------------------


def shares_root() -> str:
    return os.path.normpath(settings.STRATUS_SHARES_DIR)


def group_share_dir(group: Group | int) -> str:
    return os.path.join(shares_root(), f"group-{getattr(group, 'pk', group)}")


def course_share_dir(course: Course | int) -> str:
    """The course share's own directory: ``files`` (what instructors put) and ``ro``
    (its read-only bind, what guests get)."""
    return os.path.join(shares_root(), f"course-{getattr(course, 'pk', course)}")


def course_files_dir(course: Course | int) -> str:
    return os.path.join(course_share_dir(course), "files")


def share_specs(vm: Vm) -> tuple[ShareSpec, ...]:
    """The shares of the VM's domain: none unless it was made with them (Vm.shares)."""
    if not vm.shares:
        return ()
    return (
        ShareSpec(tag=GROUP_TAG, source=group_share_dir(vm.group_id), guest_path=GROUP_PATH),
        ShareSpec(
            tag=COURSE_TAG,
            source=os.path.join(course_share_dir(vm.group.course_id), "ro"),
            guest_path=COURSE_PATH,
            readonly=True,
        ),
    )


def share_mounts(vm: Vm) -> tuple[tuple[str, str, bool], ...]:
    """What cloud-init mounts: (tag, guest path, read-only) of each share."""
    return tuple((s.tag, s.guest_path, s.readonly) for s in share_specs(vm))


# --- what they cost ------------------------------------------------------------------------


def directory_bytes(path: str) -> int:
    """The disk a directory tree takes (allocated blocks, as ``du`` counts), never
    following a symlink a guest made; 0 when it does not exist."""
    total = 0
    for top, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
            except OSError:
                continue  # removed meanwhile
    return total


def group_share_gib(*, group: Group) -> int:
    """The group share's size in whole GiB (rounded up): what it takes of the quota."""
    return -(-directory_bytes(group_share_dir(group)) // GiB)


# --- what the clock does instead of a save --------------------------------------------------


def save_kind(vm: Vm) -> str:
    """A suspend to disk, or a shut-down for a VM whose shares QEMU cannot save."""
    return OperationKind.STOP if vm.shares else OperationKind.SAVE


def shares_refusal(kind: str, vm: Vm, state: str) -> Refused | None:
    """Why a VM with shares cannot take ``kind`` (QEMU cannot save or migrate it)."""
    if not vm.shares:
        return None
    if kind == OperationKind.SAVE:
        return Refused(
            f"{vm.name} has shared folders (/srv/group, /srv/course), which QEMU cannot save "
            "to disk: shut it down instead (the shares' files stay on the host)."
        )
    if kind == OperationKind.SNAPSHOT and state in ("running", "paused"):
        return Refused(
            f"{vm.name} has shared folders, and a snapshot of a running VM saves its memory, "
            "which QEMU cannot do with them: shut it down for a disk-only snapshot."
        )
    return None


# --- the course share: instructors put files -------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One file to put: its name in the share, its bytes, and their declared size."""

    name: str
    data: BinaryIO
    size: int


def file_name_clean(name: str) -> str:
    """A plain file name, or Invalid naming it: no directory part, no leading dot."""
    shown = (name or "")[:FILE_NAME_MAX]
    if (
        not name
        or len(name) > FILE_NAME_MAX
        or not FILE_NAME_RE.fullmatch(name)
        or name.startswith(_TEMP_PREFIX)
    ):
        raise Invalid(
            f"“{shown}” is not a file name the course share takes: letters, digits, '.', "
            f"'_', '+' and '-', not starting with '.', no directories, up to {FILE_NAME_MAX} "
            "characters."
        )
    return name


def _open_dir(parent_fd: int | None, name: str, *, mode: int) -> int:
    """A directory's fd, made if missing, never through a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as error:
        raise Refused(f"The course share's directory {name} is not a directory: {error}") from None


def _files_dir_fd(course: Course) -> int:
    root = shares_root()
    os.makedirs(root, mode=0o700, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        course_fd = _open_dir(root_fd, os.path.basename(course_share_dir(course)), mode=0o755)
    finally:
        os.close(root_fd)
    try:
        return _open_dir(course_fd, "files", mode=0o755)
    finally:
        os.close(course_fd)


def _entries(dir_fd: int) -> dict[str, os.stat_result]:
    found = {}
    for name in os.listdir(dir_fd):
        try:
            found[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
    return found


def course_share_files(*, course: Course) -> list[tuple[str, int]]:
    """(name, bytes) of the files in the course share, by name."""
    path = course_files_dir(course)
    if not os.path.isdir(path):
        return []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        entries = _entries(fd)
    finally:
        os.close(fd)
    return sorted(
        (name, st.st_size)
        for name, st in entries.items()
        if not name.startswith(_TEMP_PREFIX) and stat.S_ISREG(st.st_mode)
    )


def _copy(upload: Upload, dir_fd: int, temp: str, limit: int) -> None:
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := upload.data.read(CHUNK):
                written += len(chunk)
                if written > limit:
                    raise Refused(
                        f"{upload.name} is larger than {limit // MiB} MiB, the most one file "
                        "may be."
                    )
                out.write(chunk)
        os.chmod(temp, 0o644, dir_fd=dir_fd, follow_symlinks=False)
    except BaseException:
        os.unlink(temp, dir_fd=dir_fd)
        raise


def course_share_put(
    *, course: Course, uploads: list[Upload], by: AbstractBaseUser | None
) -> list[str]:
    """Put files into the course share (replacing those of the same name): all of them or,
    with the reason, none. ``by`` None: an operator at the shell."""
    if by is not None and not access.is_course_staff(user=by, course=course, action=Action.SHARE):
        raise NotAllowed("Only the course's instructors put files into its share.")
    if not uploads:
        raise Invalid("Choose at least one file to put into the course share.")
    names = [file_name_clean(u.name) for u in uploads]
    if len(set(names)) != len(names):
        raise Invalid("Two of the files have the same name.")
    limit = settings.SHARE_FILE_MAX_MIB * MiB
    for upload in uploads:
        if upload.size > limit:
            raise Refused(
                f"{upload.name} is {upload.size / MiB:.1f} MiB: one file in the course share is "
                f"at most {settings.SHARE_FILE_MAX_MIB} MiB."
            )
    dir_fd = _files_dir_fd(course)
    try:
        entries = _entries(dir_fd)
        for name in names:
            mode = entries[name].st_mode if name in entries else stat.S_IFREG
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # a link is replaced, not followed
                raise Refused(f"The course share has “{name}” already, and it is not a file.")
        used = directory_bytes(course_files_dir(course))
        replaced = sum(entries[n].st_blocks * 512 for n in names if n in entries)
        cap = settings.COURSE_SHARE_CAP_MIB * MiB
        if used - replaced + sum(u.size for u in uploads) > cap:
            raise Refused(
                f"The course share would hold more than {settings.COURSE_SHARE_CAP_MIB} MiB "
                f"(it holds {used / MiB:.1f} MiB): remove files first, or ask the operator "
                "to raise COURSE_SHARE_CAP_MIB."
            )
        temps = {}
        try:
            for upload in uploads:
                temps[upload.name] = f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
                _copy(upload, dir_fd, temps[upload.name], limit)
        except BaseException:
            for temp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=dir_fd)
            raise
        # A rename replaces the name itself, never what a symlink there points to.
        for name, temp in temps.items():
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    log.info(
        "course share %s: %s put %s",
        course.slug,
        getattr(by, "username", "an operator"),
        ", ".join(names),
    )
    return names


def course_share_remove(*, course: Course, names: list[str], by: AbstractBaseUser | None) -> None:
    """Take files out of the course share (names checked; a missing one is refused)."""
    if by is not None and not access.is_course_staff(user=by, course=course, action=Action.SHARE):
        raise NotAllowed("Only the course's instructors remove files from its share.")
    names = [file_name_clean(n) for n in names]
    dir_fd = _files_dir_fd(course)
    try:
        entries = _entries(dir_fd)
        missing = [n for n in names if n not in entries or not stat.S_ISREG(entries[n].st_mode)]
        if missing:
            raise Refused(f"The course share has no file “{missing[0]}”.")
        for name in names:
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    log.info(
        "course share %s: %s removed %s",
        course.slug,
        getattr(by, "username", "an operator"),
        ", ".join(names),
    )
