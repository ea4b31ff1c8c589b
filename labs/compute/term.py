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

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

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
from labs.models import Course, Operation, Snapshot, Vm

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
        if vm.shares and vm.observed_state in (S.RUNNING, S.PAUSED):
            # QEMU cannot save the memory of a VM with shares: it is shut down first (a
            # paused one forced off) and snapshotted disk-only at a later tick.
            running = vm.observed_state == S.RUNNING
            kind = OperationKind.STOP if running else OperationKind.FORCE_OFF
            try:
                asked.append(
                    dispatch.operation_create(
                        vm=vm, kind=kind, by=None, params={"clock": DEADLINE_CLOCK}
                    )
                )
            except Busy as error:
                log.info("deadline: %s; trying again next tick", error)
            continue
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


def page_buttons(*, vms: list[Vm], staff: bool, course: Course) -> None:
    """Take off the buttons the deadline denies a student: revert and reset after it,
    delete on a final snapshot (``vm.final_locked``; the template reads it). ``staff``:
    the page is the course staff's (``access.is_course_staff``)."""
    locked = not staff and deadline_passed(course)
    for vm in vms:
        vm.final_locked = not staff
        if locked:
            vm.card_kinds = [k for k in vm.card_kinds if k.kind not in LOCKED_AFTER_DEADLINE]
            vm.snapshot_kinds = [
                k for k in vm.snapshot_kinds if k.kind not in LOCKED_AFTER_DEADLINE
            ]
