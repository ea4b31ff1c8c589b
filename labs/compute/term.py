"""The deadline and the end of term (docs/course-clock.md, "The deadline", "The end of term").

**The deadline** (``Course.deadline_at``): once it has passed, every live VM of the
course's approved groups is asked for a final snapshot, ``final-<date>`` (with memory
when it runs, disk only when stopped: the snapshot executor's rule), by the course clock
(``params["clock"] == "deadline"``). A VM busy with another operation, or not settled
(suspended to disk, unknown, missing), is asked on a later tick; a VM whose final
snapshot failed ``ATTEMPTS`` times is given up (logged) so the course can finish. When
every VM has a final snapshot (a ``Snapshot`` with ``final``) ``deadline_done_at`` is set
and the course is left alone. From the deadline on, students may no longer revert or
reset, nor delete a final snapshot (``request_refusal``); staff still may.

**The end of term** (``Course.term_ends_at``): ``term_warning_days`` before it the
group page warns and members get one email (``term_warned_at``); at it, every live VM of
the course gets an ARCHIVE operation: shut down (forced after the timeout), the disk
flattened into a compressed standalone qcow2 under ``STRATUS_ARCHIVE_DIR/<course>/``
with a JSON manifest beside it and a ``VmArchive`` row, then the VM deleted as the delete
executor does. A failed archive leaves the VM (and no partial file). When no live VM is
left ``archived_at`` is set. ``archive_restore`` brings one back (``restore_archive``).

Each request is recorded by its Operation row (params name the clock), so a second tick,
or a restarted beat, asks for nothing twice while the first is queued or running.
"""

import json
import logging
import os
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from labs import access
from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    DesiredState,
    GroupStatus,
    ObservedState,
    OperationKind,
    OperationStatus,
)
from labs.compute import dispatch
from labs.errors import Busy, Refused, StratusError
from labs.models import Course, Host, Operation, Snapshot, Vm, VmArchive

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a VM whose final snapshot or archive failed this often is left to staff
DEADLINE_CLOCK = "deadline"
TERM_CLOCK = "term"
S = ObservedState
# States a final snapshot can be taken in (the snapshot kind's), and an archive from.
_SNAPSHOTTABLE = (S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED)
_ARCHIVABLE = (S.RUNNING, S.PAUSED, S.SAVED, S.SHUTOFF, S.CRASHED)
# After the deadline a student may not ask for these (course staff may).
LOCKED_AFTER_DEADLINE = (OperationKind.REVERT, OperationKind.RESET)


def _zone(course: Course):
    from labs.compute.clock import zone_of

    return zone_of(course)


def when_text(course: Course, at: datetime) -> str:
    """ "Fri 15 Jan 17:00" in the course's time zone (as the clock's outlook writes it)."""
    local = at.astimezone(_zone(course))
    return f"{local:%a} {local.day} {local:%b} {local:%H:%M}"


def deadline_passed(course: Course, *, now: datetime | None = None) -> bool:
    return course.deadline_at is not None and course.deadline_at <= (now or timezone.now())


# --- who may ask for what after the deadline ------------------------------------------------


def request_refusal(
    *, kind: str, vm: Vm, by: AbstractBaseUser | None, params: dict | None = None
) -> Refused | None:
    """Why a student may not ask for ``kind`` on ``vm`` because of the deadline, or None.
    Stratus itself (``by`` None) and the course's staff are never refused here."""
    if by is None or access.is_course_staff(user=by, course=vm.group.course_id):
        return None
    if kind == OperationKind.SNAPSHOT_DELETE:
        name = str((params or {}).get("name", ""))
        if vm.snapshots.filter(name=name, final=True).exists():
            return Refused(
                f"“{name}” is the final snapshot taken at the project deadline: only the "
                "course's staff can delete it."
            )
    if kind in LOCKED_AFTER_DEADLINE and deadline_passed(vm.group.course):
        return Refused(
            "The project deadline has passed: only the course's staff can revert or reset "
            f"{vm.name} now."
        )
    return None


# --- the deadline ---------------------------------------------------------------------------


def final_name(course: Course) -> str:
    return f"final-{course.deadline_at.astimezone(_zone(course)):%Y-%m-%d}"


def _course_vms(course: Course, *, approved_only: bool):
    vms = Vm.objects.live().filter(group__course=course)
    if approved_only:
        vms = vms.filter(group__status=GroupStatus.APPROVED)
    return list(vms.select_related("group__course", "host", "image").order_by("pk"))


def _busy(vms: list[Vm]) -> set[int]:
    return set(
        Vm.objects.filter(
            pk__in=[vm.pk for vm in vms], operations__status__in=ACTIVE_OPERATION_STATUSES
        ).values_list("pk", flat=True)
    )


def _failures(vms: list[Vm], *, kind: str, clock: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for vm_id in Operation.objects.filter(
        vm__in=[vm.pk for vm in vms],
        kind=kind,
        status=OperationStatus.FAILED,
        params__clock=clock,
    ).values_list("vm_id", flat=True):
        counts[vm_id] = counts.get(vm_id, 0) + 1
    return counts


def _free_name(vm: Vm, name: str) -> str:
    taken = set(vm.snapshots.values_list("name", flat=True))
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def deadline_tick(course: Course, *, now: datetime) -> list[Operation]:
    """Ask for the final snapshots still missing; set ``deadline_done_at`` when none is."""
    if not deadline_passed(course, now=now) or course.deadline_done_at is not None:
        return []
    vms = [vm for vm in _course_vms(course, approved_only=True) if vm.host_id is not None]
    final = set(
        Snapshot.objects.filter(vm__in=[vm.pk for vm in vms], final=True).values_list(
            "vm_id", flat=True
        )
    )
    busy = _busy(vms)
    failures = _failures(vms, kind=OperationKind.SNAPSHOT, clock=DEADLINE_CLOCK)
    asked, waiting = [], 0
    for vm in vms:
        if vm.pk in final:
            continue
        if failures.get(vm.pk, 0) >= ATTEMPTS:
            log.warning("deadline: final snapshot of %s failed %s times; given up", vm, ATTEMPTS)
            continue
        waiting += 1
        if vm.pk in busy or vm.observed_state not in _SNAPSHOTTABLE:
            continue  # next tick
        name = _free_name(vm, final_name(course))
        params = {
            "name": name,
            "with_memory": vm.observed_state in (S.RUNNING, S.PAUSED),
            "clock": DEADLINE_CLOCK,
            "final": True,
        }
        try:
            asked.append(
                dispatch.operation_create(
                    vm=vm, kind=OperationKind.SNAPSHOT, by=None, params=params
                )
            )
        except Busy as error:
            log.info("deadline: %s; trying again next tick", error)
    if waiting == 0:
        Course.objects.filter(pk=course.pk, deadline_done_at__isnull=True).update(
            deadline_done_at=now
        )
        course.deadline_done_at = now
        log.info("deadline: every VM of %s has its final snapshot", course.slug)
    return asked


def final_snapshots(course: Course) -> list[Snapshot]:
    """The course's final snapshots, for the overview: group, VM, name, time."""
    return list(
        Snapshot.objects.filter(vm__group__course=course, final=True)
        .select_related("vm__group")
        .order_by("vm__group__name", "vm__name")
    )


# --- the end of term ------------------------------------------------------------------------


def warning_due(course: Course, *, now: datetime) -> bool:
    if course.term_ends_at is None or now >= course.term_ends_at:
        return False
    return now >= course.term_ends_at - timedelta(days=course.term_warning_days)


def term_warn(course: Course, *, now: datetime) -> int:
    """Email the members of the course's approved groups once (``term_warned_at``)."""
    if not warning_due(course, now=now) or course.term_warned_at is not None:
        return 0
    claimed = Course.objects.filter(pk=course.pk, term_warned_at__isnull=True).update(
        term_warned_at=now
    )
    if not claimed:  # another tick sent it
        return 0
    course.term_warned_at = now
    from labs.people import mail

    return mail.term_ending(course=course, when=when_text(course, course.term_ends_at))


def archive_tick(course: Course, *, now: datetime) -> list[Operation]:
    """At the end of term: an ARCHIVE for every live VM; ``archived_at`` once none is left."""
    if course.term_ends_at is None or now < course.term_ends_at or course.archived_at:
        return []
    vms = _course_vms(course, approved_only=False)
    for vm in [vm for vm in vms if vm.host_id is None]:  # never created: nothing to keep
        Vm.objects.filter(pk=vm.pk).update(
            desired_state=DesiredState.DELETED, observed_state=S.DELETED
        )
    vms = [vm for vm in vms if vm.host_id is not None]
    busy = _busy(vms)
    failures = _failures(vms, kind=OperationKind.ARCHIVE, clock=TERM_CLOCK)
    asked = []
    for vm in vms:
        if vm.pk in busy or vm.observed_state not in _ARCHIVABLE:
            continue
        if failures.get(vm.pk, 0) >= ATTEMPTS:
            continue  # left to staff: the operations list says why
        try:
            asked.append(
                dispatch.operation_create(
                    vm=vm, kind=OperationKind.ARCHIVE, by=None, params={"clock": TERM_CLOCK}
                )
            )
        except Busy as error:
            log.info("end of term: %s; trying again next tick", error)
    if not vms:
        Course.objects.filter(pk=course.pk, archived_at__isnull=True).update(archived_at=now)
        course.archived_at = now
        log.info("end of term: every VM of %s is archived", course.slug)
    return asked


def term_tick(*, now: datetime | None = None) -> int:
    """Beat, every minute: deadlines, warnings and archives for every course that has one."""
    now = now or timezone.now()
    count = 0
    courses = Course.objects.exclude(deadline_at__isnull=True, term_ends_at__isnull=True)
    for course in courses.filter(archived_at__isnull=True):
        try:
            count += len(deadline_tick(course, now=now))
            count += term_warn(course, now=now)
            count += len(archive_tick(course, now=now))
        except StratusError as error:  # one course's trouble does not stop the others
            log.warning("term: %s: %s", course.slug, error)
    return count


# --- the archive (the ARCHIVE executor) ------------------------------------------------------


def archive_paths(vm: Vm) -> tuple[Path, Path]:
    """Where ``vm``'s archive and manifest go: <dir>/<course>/<group>-<vm>.qcow2 (the
    group's id added when another group's archive has the name)."""
    course_dir = Path(settings.STRATUS_ARCHIVE_DIR) / vm.group.course.slug
    stem = f"{slugify(vm.group.name) or 'group'}-{vm.name}"
    disk = course_dir / f"{stem}.qcow2"
    if disk.exists() or VmArchive.objects.filter(path=str(disk)).exists():
        disk = course_dir / f"{stem}-{vm.group_id}-{vm.pk}.qcow2"
    return disk, disk.with_suffix(".json")


def manifest_of(vm: Vm, *, sha256: str, size: int, created: datetime) -> dict:
    members = vm.group.memberships.select_related("user").order_by("user__username")
    return {
        "format": 1,
        "course": {"slug": vm.group.course.slug, "title": vm.group.course.title},
        "term": vm.group.course.term,
        "group": {"id": vm.group_id, "name": vm.group.name},
        "members": [
            {"username": m.user.username, "name": m.user.get_full_name()} for m in members
        ],
        "vm": {
            "id": vm.pk,
            "name": vm.name,
            "uuid": str(vm.uuid),
            "instance_id": vm.instance_id,
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "disk_gib": vm.disk_gib,
            "host": vm.host.name if vm.host else "",
        },
        "image": {"name": vm.image.name, "os": vm.image.os, "login_user": vm.image.login_user},
        # The archive is the disk as it was at the end of term; the snapshots (internal to
        # the old disk) are listed for the record, not kept.
        "snapshots": [
            {
                "name": s.name,
                "created_at": s.created_at.isoformat(),
                "with_memory": s.with_memory,
                "final": s.final,
            }
            for s in vm.snapshots.order_by("created_at")
        ],
        "sha256": sha256,
        "size_bytes": size,
        "created_at": created.isoformat(),
    }


def _export(vm: Vm, driver, spec, report) -> VmArchive:
    from labs.drivers.qcow2 import file_sha256

    disk, manifest_path = archive_paths(vm)
    partial = disk.with_name(disk.name + ".partial")
    try:
        report("exporting the disk (flattened, compressed)")
        driver.disk_export(spec, str(partial))
        report("checking the archive")
        sha256, size, created = file_sha256(str(partial)), partial.stat().st_size, timezone.now()
        manifest = manifest_of(vm, sha256=sha256, size=size, created=created)
        manifest["file"] = disk.name
        tmp = manifest_path.with_name(manifest_path.name + ".partial")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, manifest_path)
        os.replace(partial, disk)
        return VmArchive.objects.create(
            vm=vm, path=str(disk), size_bytes=size, sha256=sha256, manifest=manifest
        )
    except BaseException:
        for leftover in (partial, manifest_path.with_name(manifest_path.name + ".partial")):
            with suppress(FileNotFoundError):
                leftover.unlink()
        if not VmArchive.objects.filter(path=str(disk)).exists():
            for leftover in (disk, manifest_path):
                with suppress(FileNotFoundError):
                    leftover.unlink()
        raise


def vm_archive(op: Operation) -> None:
    """Shut the VM down, archive its disk, delete it. Re-run after a crash, an archive
    this operation made already is kept and only the deletion is done again."""
    from labs.compute import executors
    from labs.compute.records import (
        driver_of,
        operation_progress,
        vm_consoles_close,
        vm_observe,
    )

    vm = Vm.objects.select_related("group__course", "host", "image").get(pk=op.vm_id)
    driver, spec, report = driver_of(vm), executors.vm_spec(vm), operation_progress(op)
    made = VmArchive.objects.filter(vm=vm, created_at__gte=op.created_at).first()
    if made is None:
        was = vm.observed_state
        vm_consoles_close(vm, "the VM is being archived at the end of term")
        if was == S.SAVED:  # its memory comes back so that it can shut down cleanly
            report("restoring the VM from disk to shut it down")
            driver.start(vm.domain_name)
        report("shutting down")
        clean = driver.shutdown(vm.domain_name, timeout=settings.VM_SHUTDOWN_TIMEOUT)
        if not clean:
            report("the guest did not shut down in time; it was forced off")
        Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.STOPPED)
        vm_observe(vm, S.SHUTOFF, "")
        try:
            made = _export(vm, driver, spec, report)
        except Exception:
            if was in (S.RUNNING, S.PAUSED, S.SAVED):  # as it was: running again
                with suppress(Exception):
                    driver.start(vm.domain_name)
                    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.RUNNING)
                    executors._running(vm, driver)
            raise
        report(f"archived to {made.path} ({made.size_bytes / 2**20:.0f} MiB)")
    report("removing the VM")
    driver.delete(spec)
    Snapshot.objects.filter(vm=vm).delete()
    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.DELETED, ssh_port=None)
    vm_observe(vm, S.DELETED, "")


# --- restoring an archive (manage.py restore_archive) ---------------------------------------


@dataclass(frozen=True)
class Restored:
    vm: Vm
    archive: VmArchive
    seconds: float


def archive_find(ref: str) -> VmArchive:
    """An archive by its id or by its file's path; Refused when there is none."""
    if ref.isdigit():
        found = VmArchive.objects.filter(pk=int(ref)).select_related("vm").first()
    else:
        real = os.path.realpath(ref)
        found = next(
            (
                a
                for a in VmArchive.objects.select_related("vm")
                if os.path.realpath(a.path) == real
            ),
            None,
        )
    if found is None:
        raise Refused(f"No archive {ref} is recorded (give an archive id or its file's path).")
    return found


def archive_check(archive: VmArchive) -> dict:
    """The archive's file is there, unchanged and standalone; its qemu-img info."""
    from labs.drivers.qcow2 import ImageRefused, file_sha256, standalone_check

    if not os.path.isfile(archive.path):
        raise Refused(f"The archive file {archive.path} is missing.")
    actual = file_sha256(archive.path)
    if actual != archive.sha256:
        raise Refused(
            f"The archive file {archive.path} does not match its checksum (recorded "
            f"{archive.sha256[:16]}…, the file has {actual[:16]}…): it is damaged or was "
            "replaced; not restored."
        )
    try:
        return standalone_check(archive.path)
    except ImageRefused as error:
        raise Refused(f"Not restored: {error}.") from error


def archive_restore(*, archive: VmArchive, host: Host | None = None, name: str = "") -> Restored:
    """Bring an archived VM back: the same group, its name (or ``name``), the archived
    disk as its disk (copied into the host's pool), the same instance id so the guest
    boots as it was. Refused with a clear message when it cannot be."""
    import time

    from labs.compute import placement, ssh_access
    from labs.compute.executors import _running, vm_seed, vm_spec
    from labs.compute.records import driver_of

    started = time.monotonic()
    archive_check(archive)
    old = Vm.objects.select_related("group__course", "host", "image").get(pk=archive.vm_id)
    name = name or old.name
    host = host or old.host
    if host is None:
        raise Refused("The archived VM had no host: name one with --host.")
    with transaction.atomic():
        clash = Vm.objects.filter(group=old.group, name=name)
        if name == old.name:
            clash = clash.exclude(pk=old.pk)
        if clash.exists() or (name == old.name and old.desired_state != DesiredState.DELETED):
            raise Refused(
                f"The group {old.group.name} already has a VM named {name}: choose another "
                "name with --name."
            )
        taken = placement._ports_taken([host])[host.pk]
        port = placement._free_ssh_port(host, taken)
        if port is None:
            raise Refused(f"Host {host.name} has no free SSH port.")
        if name == old.name:
            vm = old
        else:  # a new VM of the group around the same disk
            vm = Vm(
                group=old.group,
                name=name,
                image=old.image,
                vcpus=old.vcpus,
                memory_mib=old.memory_mib,
                disk_gib=old.disk_gib,
                instance_id=old.instance_id,
            )
        vm.host, vm.ssh_port = host, port
        vm.desired_state, vm.observed_state = DesiredState.RUNNING, S.NEW
        vm.status_message = f"Restored from the archive of {archive.created_at:%Y-%m-%d}."
        vm.save()
    vm = Vm.objects.select_related("group__course", "host", "image").get(pk=vm.pk)
    driver = driver_of(vm)
    wanted = ssh_access.access_wanted(vm)
    try:
        driver.restore(vm_spec(vm), disk=archive.path, seed_iso=vm_seed(vm, wanted))
    except Exception:
        with suppress(Exception):
            driver.delete(vm_spec(vm))
        Vm.objects.filter(pk=vm.pk).update(
            desired_state=DesiredState.DELETED, observed_state=S.DELETED, ssh_port=None
        )
        raise
    # The disk holds the accounts and keys of its last day: bring them up to date.
    _running(vm, driver)
    ssh_access.vm_access_unknown(vm)
    VmArchive.objects.filter(pk=archive.pk).update(restored_at=timezone.now())
    vm.refresh_from_db()
    return Restored(vm=vm, archive=archive, seconds=time.monotonic() - started)


# --- what the pages say ---------------------------------------------------------------------


@dataclass(frozen=True)
class TermNotice:
    """The deadline's and the end of term's lines on a group page."""

    deadline: str  # "Final snapshot at Fri 15 Jan 17:00" or "" (no deadline)
    deadline_passed: bool
    term_ends: str  # "The term ends on …: …" within the warning days, else ""
    zone: str


def group_notice(*, course: Course, now: datetime | None = None) -> TermNotice | None:
    now = now or timezone.now()
    deadline, passed, ends = "", False, ""
    if course.deadline_at is not None:
        passed = deadline_passed(course, now=now)
        at = when_text(course, course.deadline_at)
        deadline = (
            f"The project deadline passed on {at}: every VM has (or is getting) its final "
            "snapshot; revert and reset are for the course's staff now."
            if passed
            else f"Final snapshot at {at}"
        )
    if warning_due(course, now=now):
        ends = (
            f"The term ends on {when_text(course, course.term_ends_at)}: your VMs will be "
            "archived and removed then; copy what you need"
        )
    if not (deadline or ends):
        return None
    return TermNotice(
        deadline=deadline, deadline_passed=passed, term_ends=ends, zone=course.time_zone
    )


def page_buttons(*, vms: list[Vm], user: AbstractBaseUser, course: Course) -> None:
    """Take off the buttons the deadline denies a student: revert and reset after it,
    delete on a final snapshot (``vm.final_locked``; the template reads it)."""
    staff = access.is_course_staff(user=user, course=course.pk)
    locked = not staff and deadline_passed(course)
    for vm in vms:
        vm.final_locked = not staff
        if locked:
            vm.card_kinds = [k for k in vm.card_kinds if k.kind not in LOCKED_AFTER_DEADLINE]
            vm.snapshot_kinds = [
                k for k in vm.snapshot_kinds if k.kind not in LOCKED_AFTER_DEADLINE
            ]
