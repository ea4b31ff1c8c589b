"""The course clock, class schedules: VMs ready before a class, suspended or stopped after.

A course's ``ClassSession`` rows (weekly, or once on a date) are local times in the
course's time zone; ``ClassHoliday`` rows cancel the occurrences on their days. The
occurrences, merged where they overlap or touch, are the course's class *windows*.
Around each window the clock acts twice, once per VM (docs/course-clock.md):

- **before**: from ``lead`` minutes before the window's start until its end, a stopped
  VM is started and a suspended one (in RAM or to disk) resumed;
- **after**: from the window's end until the next window's ready time (at most
  ``AFTER_DEADLINE`` later), a running VM is suspended or shut down (``clock_after``),
  unless a member is active in it: an open, not view-only console session.

Each (VM, window, phase) is decided once: a ``ClockAction`` row records it (with the
Operation asked for, or none when the VM already was as wanted), and its unique
constraint makes a second tick, or a beat restarted mid-minute, a no-op. A VM busy with
another operation, one with an active member, or one not created yet is left for the
next tick until the phase's deadline.

Local times that do not exist (the hour skipped in spring) are shifted forward by the
gap, 02:30 becoming 03:30; local times that happen twice (the hour repeated in autumn)
are the first of the two (``fold=0``, summer time). A 10:00 class is 10:00 local on both
sides of a change.

``occurrences``, ``windows``, ``next_window`` and ``due_actions`` only read;
``clock_tick`` (beat, every minute: ``labs.tasks.course_clock_tick``) writes.
"""

import logging
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    ClockAfter,
    ClockPhase,
    GroupStatus,
    ObservedState,
    OperationKind,
)
from labs.compute import dispatch, kinds
from labs.errors import Busy, StratusError
from labs.models import ClassHoliday, ClassSession, ClockAction, ConsoleSession, Course, Vm

log = logging.getLogger(__name__)

AFTER_DEADLINE = timedelta(hours=2)  # the after phase is given up this long after a class
NOTICE = timedelta(minutes=15)  # the group page says "suspends in 10 min" this close
HORIZON_DAYS = 400  # how far ahead next_window looks


@dataclass(frozen=True)
class Window:
    """One stretch of class time (overlapping or touching occurrences merged), aware
    datetimes in the course's time zone."""

    start: datetime
    end: datetime

    @property
    def key(self) -> datetime:
        """What a ClockAction records: the start in UTC."""
        return self.start.astimezone(UTC)


@dataclass(frozen=True)
class Due:
    """What the clock wants done to one VM now; ``kind`` None: nothing, record it only."""

    vm: Vm
    window: Window
    phase: str
    kind: str | None


def zone_of(course: Course) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(course.time_zone)


def local_datetime(day: date, at: time, zone: zoneinfo.ZoneInfo) -> datetime:
    """``day`` at ``at`` in ``zone``: a skipped local time is shifted forward by the gap,
    a repeated one is its first occurrence (see the module's docstring)."""
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=zone, fold=0)
    # Round-tripping through UTC normalises a time in a gap: fold=0 uses the offset before
    # the change, so 02:30 in a skipped hour comes back as 03:30.
    return first.astimezone(UTC).astimezone(zone)


def _sessions(course: Course) -> list[ClassSession]:
    cached = getattr(course, "_clock_sessions", None)
    if cached is None:
        cached = list(ClassSession.objects.filter(course=course))
        holidays = list(ClassHoliday.objects.filter(course=course))
        course._clock_sessions = cached
        course._clock_holidays = holidays
    return cached


def _holidays(course: Course) -> list[ClassHoliday]:
    _sessions(course)
    return course._clock_holidays


def _on_holiday(day: date, holidays: list[ClassHoliday]) -> bool:
    return any(h.first_day <= day <= h.last_day for h in holidays)


def _meets_on(session: ClassSession, day: date) -> bool:
    if session.date is not None:
        return session.date == day
    if day.weekday() != session.weekday:
        return False
    if session.valid_from and day < session.valid_from:
        return False
    return not (session.valid_until and day > session.valid_until)


def occurrences(course: Course, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """The classes of ``course`` that overlap [start, end), in its time zone, in order;
    holidays left out."""
    zone = zone_of(course)
    sessions = _sessions(course)
    holidays = _holidays(course)
    found = []
    day = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    while day <= last:
        if not _on_holiday(day, holidays):
            for session in sessions:
                if _meets_on(session, day):
                    begins = local_datetime(day, session.starts_at, zone)
                    ends = local_datetime(day, session.ends_at, zone)
                    if begins < end and ends > start and ends > begins:
                        found.append((begins, ends))
        day += timedelta(days=1)
    return sorted(found)


def windows(course: Course, start: datetime, end: datetime) -> list[Window]:
    """The class windows overlapping [start, end): occurrences merged where one begins
    before (or just when) the previous one ends."""
    merged: list[list[datetime]] = []
    for begins, ends in occurrences(course, start, end):
        if merged and begins <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], ends)
        else:
            merged.append([begins, ends])
    return [Window(start=b, end=e) for b, e in merged]


def next_window(course: Course, now: datetime) -> Window | None:
    """The class going on at ``now``, or the next one (within ``HORIZON_DAYS``)."""
    step = timedelta(days=14)
    since = now
    while since < now + timedelta(days=HORIZON_DAYS):
        # From a day back, so a window that began before ``since`` is whole when merged.
        for window in windows(course, since - timedelta(days=1), since + step):
            if window.end > now:
                return window
        since += step
    return None


def lead_of(course: Course) -> timedelta:
    return timedelta(minutes=course.clock_lead_minutes)


def phases_at(course: Course, now: datetime) -> list[tuple[Window, str]]:
    """The (window, phase) pairs whose time to act includes ``now``."""
    lead = lead_of(course)
    around = windows(course, now - AFTER_DEADLINE - timedelta(days=1), now + lead + AFTER_DEADLINE)
    found = []
    for i, window in enumerate(around):
        if window.start - lead <= now < window.end:
            found.append((window, ClockPhase.BEFORE))
        if course.clock_after == ClockAfter.LEAVE:
            continue
        deadline = window.end + AFTER_DEADLINE
        if i + 1 < len(around):
            deadline = min(deadline, around[i + 1].start - lead)
        if window.end <= now < deadline:
            found.append((window, ClockPhase.AFTER))
    return found


def _want(course: Course, phase: str, state: str) -> str | None:
    """The operation a VM in ``state`` needs for ``phase``; None when it is as wanted."""
    if phase == ClockPhase.BEFORE:
        if state in (ObservedState.SHUTOFF, ObservedState.CRASHED):
            return OperationKind.START
        if state in (ObservedState.PAUSED, ObservedState.SAVED):  # SAVED: suspended to disk
            return OperationKind.RESUME
        return None
    if state != ObservedState.RUNNING:
        return None
    return OperationKind.STOP if course.clock_after == ClockAfter.STOP else OperationKind.SUSPEND


# States the clock cannot judge yet: wait for the next tick (the deadline bounds it).
_UNSETTLED = (ObservedState.NEW, ObservedState.MISSING, ObservedState.UNKNOWN)


def due_actions(course: Course, now: datetime) -> list[Due]:
    """What the clock should decide for ``course``'s VMs at ``now``: every (VM, window,
    phase) not decided yet, except VMs busy with another operation, not created yet, or
    (after class) with a member active in the console: those wait for a later tick."""
    phases = phases_at(course, now)
    if not phases:
        return []
    vms = list(
        Vm.objects.live()
        .filter(group__course=course, group__status=GroupStatus.APPROVED, host__isnull=False)
        .select_related("group")
        .order_by("pk")
    )
    busy = set(
        Vm.objects.filter(
            pk__in=[vm.pk for vm in vms], operations__status__in=ACTIVE_OPERATION_STATUSES
        ).values_list("pk", flat=True)
    )
    active = set(
        ConsoleSession.objects.filter(
            vm__in=[vm.pk for vm in vms], ended_at__isnull=True, view_only=False
        ).values_list("vm_id", flat=True)
    )
    decided = set(
        ClockAction.objects.filter(
            vm__in=[vm.pk for vm in vms], window_start__in=[w.key for w, _ in phases]
        ).values_list("vm_id", "window_start", "phase")
    )
    due = []
    for window, phase in phases:
        for vm in vms:
            if (vm.pk, window.key, phase) in decided or vm.pk in busy:
                continue
            if vm.observed_state in _UNSETTLED:
                continue
            kind = _want(course, phase, vm.observed_state)
            if kind is not None and phase == ClockPhase.AFTER and vm.pk in active:
                continue
            due.append(Due(vm=vm, window=window, phase=phase, kind=kind))
    return due


def courses_scheduled():
    return Course.objects.filter(class_sessions__isnull=False).distinct()


def action_take(*, due: Due) -> ClockAction | None:
    """Record one decision and ask for its operation (by the course clock: no person,
    ``params["clock"]`` the window's start). None: another tick decided it first, or the
    VM became busy or unsuitable (the next tick looks again)."""
    try:
        with transaction.atomic():
            record = ClockAction.objects.create(
                vm=due.vm, window_start=due.window.key, phase=due.phase
            )
            if due.kind is not None:
                entry = kinds.kind_of(due.kind)
                refused = kinds.refusal(entry, due.vm, active=None)
                if refused is not None:
                    raise refused
                record.operation = dispatch.operation_create(
                    vm=due.vm,
                    kind=due.kind,
                    by=None,
                    params={"clock": due.window.key.isoformat(), "phase": due.phase},
                )
                record.save(update_fields=["operation"])
    except IntegrityError:  # another tick recorded it first
        return None
    except Busy as error:  # an operation started since due_actions looked
        log.info("course clock: %s; trying again next tick", error)
        return None
    except StratusError as error:  # a refusal: the VM's state changed meanwhile
        log.info("course clock: %s %s skipped: %s", due.phase, due.vm, error)
        return None
    return record


def clock_tick(*, now: datetime | None = None) -> list[ClockAction]:
    """Beat, every minute: decide what is due for every course with a schedule."""
    now = now or timezone.now()
    taken = []
    for course in courses_scheduled():
        for due in due_actions(course, now):
            record = action_take(due=due)
            if record is not None:
                taken.append(record)
    return taken


# --- what the group page says ---------------------------------------------------------------


@dataclass(frozen=True)
class Outlook:
    """The next class of a course and what the clock will do around it, for the pages."""

    window: Window
    zone: str
    ready_at: datetime
    after: str  # ClockAfter
    now: datetime

    @property
    def in_class(self) -> bool:
        return self.window.start <= self.now < self.window.end

    @property
    def when(self) -> str:
        """ "Tue 8 Dec 10:00–11:30" in the course's zone."""
        start, end = self.window.start, self.window.end
        day = f"{start:%a} {start.day} {start:%b}"
        if end.date() != start.date():
            return f"{day} {start:%H:%M} – {end:%a} {end.day} {end:%b} {end:%H:%M}"
        return f"{day} {start:%H:%M}–{end:%H:%M}"

    @property
    def ready_text(self) -> str:
        """When the VMs are started, "09:50" (with the day when it is another day)."""
        if self.ready_at.date() != self.window.start.date():
            return f"{self.ready_at:%a} {self.ready_at:%H:%M}"
        return f"{self.ready_at:%H:%M}"

    @property
    def after_text(self) -> str:
        return {
            ClockAfter.SUSPEND: "suspended",
            ClockAfter.STOP: "shut down",
            ClockAfter.LEAVE: "left running",
        }[self.after]

    @property
    def soon(self) -> str:
        """ "VMs start in 5 min" or "VMs suspend in 10 min" when that is near."""
        if self.now < self.ready_at and self.ready_at - self.now <= NOTICE:
            return f"VMs start in {_minutes(self.ready_at - self.now)}"
        ends_in = self.window.end - self.now
        if self.in_class and self.after != ClockAfter.LEAVE and ends_in <= NOTICE:
            verb = "suspend" if self.after == ClockAfter.SUSPEND else "shut down"
            return f"VMs {verb} in {_minutes(ends_in)}"
        return ""


def _minutes(delta: timedelta) -> str:
    return f"{max(1, -(-int(delta.total_seconds()) // 60))} min"


def course_outlook(*, course: Course, now: datetime | None = None) -> Outlook | None:
    """The next (or current) class and the clock's plan for it; None without a schedule."""
    now = now or timezone.now()
    if not ClassSession.objects.filter(course=course).exists():
        return None
    window = next_window(course, now)
    if window is None:
        return None
    zone = zone_of(course)
    return Outlook(
        window=window,
        zone=course.time_zone,
        ready_at=(window.start - lead_of(course)).astimezone(zone),
        after=course.clock_after,
        now=now.astimezone(zone),
    )
