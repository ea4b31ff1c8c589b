"""Usage hours: how long each VM, group and student kept VMs running this term, and the
course's hours quota (warned at 80 %, VMs suspended to disk at 100 %).

What counts (docs/decisions.md, "Usage hours"):

- A *stretch* runs from a RUNNING row of a VM's state history (``StateChange``, written
  by ``labs.compute.records``) to that VM's next row; the open stretch of a VM running
  now runs to now. Only RUNNING counts: a PAUSED VM holds memory but no CPU, a SAVED one
  holds nothing but disk, and the course clock itself suspends VMs after class, so
  counting either would charge a group for what Stratus did to save hours. UNKNOWN is a
  host that did not answer: Stratus cannot tell that the VM ran, and reconcile writes
  RUNNING again when the host answers, so an outage is never charged.
- The term runs from the course's creation (or its first state change, if earlier) to
  now.
- With ``Course.hours_exclude_class`` the parts of stretches inside the course's class
  windows (``labs.compute.clock.windows``: merged occurrences, holidays left out, local
  time across daylight-saving changes) are subtracted, exactly.
- A student's hours are the stretches whose RUNNING row names them (``started_by``: who
  asked for the start, resume, reset or revert that made it run). Stretches started by
  the clock, by Stratus or by course staff count for the group only.

One query reads a course's whole state history (two more its class schedule): the
overview of a 50-group course is counted in one pass. ``usage_count`` and the page
helpers only read; ``usage_tick`` (beat, every 5 minutes: ``labs.tasks.usage_tick``)
writes.
"""

import logging
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from labs import access
from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    STAFF_ROLES,
    DesiredState,
    GroupStatus,
    ObservedState,
    OperationKind,
    Role,
)
from labs.compute import clock, dispatch, kinds, shares
from labs.errors import OverQuota, StratusError
from labs.live import events
from labs.models import Course, Group, Membership, Operation, Snapshot, StateChange, Vm

log = logging.getLogger(__name__)

WARN_AT = 0.8  # the share of the allowance at which a group is warned
HOURS_CLOCK = "hours"  # params["clock"] of the saves the quota asks for
IDLE_CLOCK = "idle"  # params["clock"] of the idle rule's saves (labs/compute/idle.py)
# The kinds that make a stopped or suspended VM run: refused to a student over the hours.
STARTING_KINDS = frozenset({OperationKind.START, OperationKind.RESUME, OperationKind.RESET})


# --- interval arithmetic -----------------------------------------------------------------------


def _merged(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted, non-overlapping UTC spans (overlapping or touching ones joined)."""
    out: list[list[datetime]] = []
    for start, end in sorted((s.astimezone(UTC), e.astimezone(UTC)) for s, e in spans):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def minus(
    start: datetime,
    end: datetime,
    holes: list[tuple[datetime, datetime]],
    ends: list[datetime] | None = None,
) -> list[tuple[datetime, datetime]]:
    """[start, end) without the ``holes`` (sorted, non-overlapping UTC spans, as
    ``_merged`` makes them; ``ends``: their ends, when the caller has them): the pieces
    left, in order. Arithmetic in UTC, so a daylight-saving change is an hour more or
    less, as it was."""
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    pieces = []
    # The first hole that ends after ``start``: holes are sorted by start and by end alike.
    i = bisect_right(ends if ends is not None else [e for _, e in holes], start)
    cursor = start
    while i < len(holes) and holes[i][0] < end:
        hole_start, hole_end = holes[i]
        if hole_start > cursor:
            pieces.append((cursor, hole_start))
        cursor = max(cursor, hole_end)
        i += 1
    if cursor < end:
        pieces.append((cursor, end))
    return pieces


def _seconds(pieces) -> float:
    return sum((e - s).total_seconds() for s, e in pieces)


# --- counting ------------------------------------------------------------------------------


@dataclass
class Counted:
    """A course's running time this term (seconds), by VM, group, student and local day."""

    course: Course
    since: datetime
    now: datetime
    vm: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    group: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    student: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    day: dict[date, float] = field(default_factory=lambda: defaultdict(float))
    # A VM running now (by its history): who started its open stretch (None: no person).
    running_by: dict[int, int | None] = field(default_factory=dict)

    def group_hours(self, group_id: int) -> float:
        return self.group.get(group_id, 0.0) / 3600

    def student_hours(self, user_id: int) -> float:
        return self.student.get(user_id, 0.0) / 3600


def class_holes(course: Course, since: datetime, now: datetime) -> list[tuple[datetime, datetime]]:
    """The class windows of the term as UTC spans (none when class time counts)."""
    if not course.hours_exclude_class or now <= since:
        return []
    return _merged([(w.start, w.end) for w in clock.windows(course, since, now)])


class _Days:
    """Cuts UTC spans at the course's local midnights (each midnight computed once)."""

    def __init__(self, zone) -> None:
        self.zone = zone
        self.midnights: dict[date, datetime] = {}

    def _end_of(self, day: date) -> datetime:
        midnight = self.midnights.get(day)
        if midnight is None:
            after = day + timedelta(days=1)
            midnight = clock.local_datetime(after, time(0), self.zone).astimezone(UTC)
            self.midnights[day] = midnight
        return midnight

    def split(self, start: datetime, end: datetime) -> list[tuple[date, float]]:
        """[start, end) as (local day, seconds) pairs."""
        out = []
        day = start.astimezone(self.zone).date()
        while True:
            midnight = self._end_of(day)
            if end <= midnight:
                out.append((day, (end - start).total_seconds()))
                return out
            out.append((day, (midnight - start).total_seconds()))
            start, day = midnight, day + timedelta(days=1)


def usage_count(
    *,
    course: Course,
    group: Group | None = None,
    student: AbstractBaseUser | None = None,
    now: datetime | None = None,
    by_day: bool = False,
) -> Counted:
    """Count the course's running time: one query for the state history. With ``group``
    only that group's VMs are read (and, with ``student``, every VM of the course the
    student started: their hours are theirs across groups); ``by_day`` also sums the
    hours per local day (the chart)."""
    now = (now or timezone.now()).astimezone(UTC)
    rows = StateChange.objects.filter(vm__group__course=course)
    if group is not None:
        mine = Q(vm__group=group)
        if student is not None:
            started = StateChange.objects.filter(
                started_by=student, vm__group__course=course
            ).values("vm_id")
            mine |= Q(vm__in=started)
        rows = rows.filter(mine)
    rows = list(
        rows.order_by("vm_id", "at", "pk").values_list(
            "vm_id", "vm__group_id", "state", "at", "started_by_id"
        )
    )
    since = course.created_at or now
    if rows:
        since = min(since, min(r[3] for r in rows))
    since = since.astimezone(UTC)
    counted = Counted(course=course, since=since, now=now)
    holes = class_holes(course, since, now)
    ends = [e for _, e in holes]
    days = _Days(clock.zone_of(course))
    for i, (vm_id, group_id, state, at, started_by) in enumerate(rows):
        if state != ObservedState.RUNNING:
            continue
        following = rows[i + 1] if i + 1 < len(rows) else None
        if following is not None and following[0] == vm_id:
            end = following[3]
        else:
            end = now
            counted.running_by[vm_id] = started_by
        start, end = max(at.astimezone(UTC), since), min(end.astimezone(UTC), now)
        if end <= start:
            continue
        pieces = minus(start, end, holes, ends) if holes else [(start, end)]
        seconds = _seconds(pieces)
        counted.vm[vm_id] += seconds
        counted.group[group_id] += seconds
        if started_by is not None:
            counted.student[started_by] += seconds
        if not by_day:
            continue
        for piece_start, piece_end in pieces:
            for day, part in days.split(piece_start, piece_end):
                counted.day[day] += part
    return counted


# --- the quota ------------------------------------------------------------------------------


def allowance_of(*, course: Course, group: Group) -> int | None:
    """The group's hours this term (a student's too, when counted each): the course's
    hours plus the group's extra hours; None: no limit."""
    if course.hours_quota is None:
        return None
    return course.hours_quota + group.extra_hours


def _level(used: float, allowance: int | None) -> str:
    if allowance is None:
        return "ok"
    if used >= allowance:
        return "over"
    return "warn" if used >= WARN_AT * allowance else "ok"


def over_message(*, allowance: int, you: bool) -> str:
    whose = "You have used your" if you else "Your group has used its"
    return f"{whose} {allowance} h for this term; ask your instructor for more hours."


def in_free_class(course: Course, now: datetime) -> bool:
    """Class is on now and class time does not count (so the quota does not bite)."""
    if not course.hours_exclude_class:
        return False
    return bool(clock.windows(course, now, now + timedelta(seconds=1)))


def hours_check(*, kind: str, vm: Vm, by: AbstractBaseUser | None) -> None:
    """A student of a group that used its hours (or, counted each, who used theirs) may
    not make its VMs run; Stratus and course staff may. OverQuota says why."""
    if by is None or kind not in STARTING_KINDS:
        return
    group, course = vm.group, vm.group.course
    allowance = allowance_of(course=course, group=group)
    if allowance is None:
        return
    if access.is_course_staff(user=by, course=course, action=access.Action.OPERATE):
        return
    now = timezone.now()
    if in_free_class(course, now):
        return
    student = by if course.hours_per_student else None
    counted = usage_count(course=course, group=group, student=student, now=now)
    if counted.group_hours(group.pk) >= allowance:
        raise OverQuota(over_message(allowance=allowance, you=False))
    if course.hours_per_student and counted.student_hours(by.pk) >= allowance:
        raise OverQuota(over_message(allowance=allowance, you=True))


# --- what the group page says ------------------------------------------------------------------


@dataclass(frozen=True)
class GroupHours:
    used: float
    allowance: int | None
    level: str  # ok, warn, over
    you: float | None = None  # the viewer's own hours (counted each, a student viewer)
    you_level: str = "ok"

    @property
    def message(self) -> str:
        if self.allowance is None:
            return ""
        if self.level == "over":
            return over_message(allowance=self.allowance, you=False)
        if self.you_level == "over":
            return over_message(allowance=self.allowance, you=True)
        return ""

    @property
    def css(self) -> str:
        """The line's style: the worse of the group's level and the viewer's."""
        levels = (self.level, self.you_level)
        return next((lv for lv in ("over", "warn") if lv in levels), "ok")


def group_hours(
    *, group: Group, user: AbstractBaseUser, now: datetime | None = None
) -> GroupHours:
    """The group page's "Hours: 12.5 of 40 h this term" line (and the viewer's own)."""
    course = group.course
    student = None
    if (
        course.hours_per_student
        and group.memberships.filter(user=user, role=Role.STUDENT).exists()
    ):
        student = user
    counted = usage_count(course=course, group=group, student=student, now=now)
    allowance = allowance_of(course=course, group=group)
    used = counted.group_hours(group.pk)
    you = you_level = None
    if student is not None:
        you = counted.student_hours(user.pk)
        you_level = _level(you, allowance)
    return GroupHours(
        used=used,
        allowance=allowance,
        level=_level(used, allowance),
        you=you,
        you_level=you_level or "ok",
    )


# --- the beat task ---------------------------------------------------------------------------


def _vm_save(vm: Vm) -> Operation | None:
    kind = shares.save_kind(vm)  # a VM with shares is shut down: QEMU cannot save it
    entry = kinds.kind_of(kind)
    try:
        with transaction.atomic():
            refused = kinds.refusal(entry, vm, active=None)
            if refused is not None:
                raise refused
            return dispatch.operation_create(
                vm=vm, kind=kind, by=None, params={"clock": HOURS_CLOCK}
            )
    except StratusError as error:  # busy or changed since: the next tick looks again
        log.info("usage hours: %s not saved: %s", vm, error)
        return None


def _staff_ids(course: Course, user_ids) -> set[int]:
    from django.contrib.auth import get_user_model

    ids = {u for u in user_ids if u is not None}
    if not ids:
        return set()
    return set(
        get_user_model()
        .objects.filter(pk__in=ids)
        .filter(
            Q(is_superuser=True) | Q(memberships__course=course, memberships__role__in=STAFF_ROLES)
        )
        .values_list("pk", flat=True)
    )


def course_hours_enforce(*, course: Course, now: datetime | None = None) -> list[Operation]:
    """Warn the groups of ``course`` past 80 % (once) and save the running VMs of those
    at 100 % (those a student over their own hours started, counted each). VMs busy
    with another operation wait for the next tick; a VM course staff started stays up;
    during a class that does not count nothing is saved."""
    now = now or timezone.now()
    counted = usage_count(course=course, now=now)
    groups = list(Group.objects.filter(course=course, status=GroupStatus.APPROVED))
    members: dict[int, list[int]] = defaultdict(list)
    for group_id, user_id in Membership.objects.filter(
        course=course, group__in=groups, role=Role.STUDENT
    ).values_list("group_id", "user_id"):
        members[group_id].append(user_id)
    over_groups, over_students = set(), set()
    for group in groups:
        allowance = allowance_of(course=course, group=group)
        if allowance is None:
            continue
        used = counted.group_hours(group.pk)
        if course.hours_per_student:
            mine = {u: counted.student_hours(u) for u in members[group.pk]}
            over_students |= {u for u, h in mine.items() if h >= allowance}
            used_for_warning = max([used, *mine.values()])
        else:
            used_for_warning = used
        if used >= allowance:
            over_groups.add(group.pk)
        if used_for_warning >= WARN_AT * allowance:
            if Group.objects.filter(pk=group.pk, hours_warned_at=None).update(hours_warned_at=now):
                events.group_changed(group=group)
        elif group.hours_warned_at is not None:  # more hours granted: warn again later
            Group.objects.filter(pk=group.pk).update(hours_warned_at=None)
    if not (over_groups or over_students) or in_free_class(course, now):
        return []
    vms = list(
        Vm.objects.live()
        .filter(
            group__in=over_groups | {g.pk for g in groups if set(members[g.pk]) & over_students},
            observed_state=ObservedState.RUNNING,
            host__isnull=False,
        )
        .exclude(operations__status__in=ACTIVE_OPERATION_STATUSES)
        .select_related("group__course")
        .order_by("pk")
    )
    staff = _staff_ids(course, [counted.running_by.get(vm.pk) for vm in vms])
    saved = []
    for vm in vms:
        started_by = counted.running_by.get(vm.pk)
        if started_by in staff:
            continue
        if vm.group_id not in over_groups and started_by not in over_students:
            continue
        if (op := _vm_save(vm)) is not None:
            saved.append(op)
    return saved


def usage_tick(*, now: datetime | None = None) -> list[Operation]:
    """Beat, every 5 minutes: the hours quota of every course that sets one."""
    saved = []
    for course in Course.objects.filter(hours_quota__isnull=False, archived_at__isnull=True):
        saved += course_hours_enforce(course=course, now=now)
    return saved


# --- reports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportRow:
    group_id: int
    group: str
    student: str  # "" on a group's row
    hours: float
    vms: int | None = None
    snapshots: int | None = None
    idle_suspensions: int | None = None
    allowance: int | None = None
    level: str = "ok"


@dataclass(frozen=True)
class Bar:
    day: date
    hours: float
    x: float
    y: float
    width: float
    height: float

    @property
    def title(self) -> str:
        return f"{self.day:%a} {self.day.day} {self.day:%b}: {self.hours:.1f} h"


@dataclass(frozen=True)
class Chart:
    """Hours per day across the term, laid out for an inline SVG (no script, no style)."""

    bars: list[Bar]
    width: int
    height: int
    top: int  # the y axis' top value, hours
    ticks: list[tuple[float, str]]  # y, label
    labels: list[tuple[float, str]]  # x, label (some days)
    left: int
    bottom: float

    @property
    def summary(self) -> str:
        total = sum(b.hours for b in self.bars)
        if not self.bars:
            return "No days yet."
        first, last = self.bars[0].day, self.bars[-1].day
        return f"{total:.1f} running hours from {first.day} {first:%b} to {last.day} {last:%b %Y}."


LIVE_STATES = (DesiredState.RUNNING, DesiredState.STOPPED)  # a VM not deleted
CHART_W, CHART_H, LEFT, BOTTOM, TOP_PAD = 720, 200, 40, 24, 8


def _nice_top(peak: float) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000, 2000, 5000):
        if peak <= step:
            return step
    return int(peak) + 1


def chart_of(counted: Counted) -> Chart:
    zone = clock.zone_of(counted.course)
    first = counted.since.astimezone(zone).date()
    last = counted.now.astimezone(zone).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    hours = [counted.day.get(d, 0.0) / 3600 for d in days]
    top = _nice_top(max(hours, default=0.0))
    plot_w, plot_h = CHART_W - LEFT - 4, CHART_H - BOTTOM - TOP_PAD
    slot = plot_w / max(len(days), 1)
    bottom = TOP_PAD + plot_h
    bars = []
    for n, (d, h) in enumerate(zip(days, hours, strict=True)):
        height = plot_h * h / top
        bars.append(
            Bar(
                day=d,
                hours=h,
                x=round(LEFT + n * slot + slot * 0.1, 2),
                y=round(bottom - height, 2),
                width=round(max(slot * 0.8, 0.5), 2),
                height=round(height, 2),
            )
        )
    ticks = [(round(bottom - plot_h * f, 2), f"{top * f:g} h") for f in (0, 0.5, 1)]
    every = max(1, -(-len(days) // 8))
    labels = [
        (round(LEFT + n * slot + slot / 2, 2), f"{d.day} {d:%b}")
        for n, d in enumerate(days)
        if n % every == 0
    ]
    return Chart(
        bars=bars,
        width=CHART_W,
        height=CHART_H,
        top=top,
        ticks=ticks,
        labels=labels,
        left=LEFT,
        bottom=bottom,
    )


@dataclass(frozen=True)
class Report:
    course: Course
    rows: list[ReportRow]
    chart: Chart
    per_student: bool
    total: float


def _count(model, path: str, **filters):
    """A correlated COUNT subquery of ``model`` rows per group."""
    inner = (
        model.objects.filter(**{path: OuterRef("pk")}, **filters)
        .order_by()
        .values(path)
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(inner, output_field=IntegerField()), Value(0))


def course_report(*, course: Course, now: datetime | None = None) -> Report:
    """The overview's Usage section and the CSV: hours per group (and per student), VMs,
    snapshots held and idle suspensions, and hours per day. Five queries whatever the
    number of groups: the state history, the schedule (two), the groups with their
    counts, the members."""
    counted = usage_count(course=course, now=now, by_day=True)
    groups = (
        Group.objects.filter(course=course, status=GroupStatus.APPROVED)
        .annotate(
            n_vms=_count(Vm, "group", desired_state__in=LIVE_STATES),
            n_snapshots=_count(Snapshot, "vm__group"),
            n_idle=_count(
                Operation, "vm__group", kind=OperationKind.SAVE, params__clock=IDLE_CLOCK
            ),
        )
        .order_by("name")
    )
    students: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for group_id, user_id, username in (
        Membership.objects.filter(course=course, group__isnull=False, role=Role.STUDENT)
        .order_by("user__username")
        .values_list("group_id", "user_id", "user__username")
    ):
        students[group_id].append((user_id, username))
    rows = []
    for g in groups:
        allowance = allowance_of(course=course, group=g)
        used = counted.group_hours(g.pk)
        rows.append(
            ReportRow(
                group_id=g.pk,
                group=g.name,
                student="",
                hours=used,
                vms=g.n_vms,
                snapshots=g.n_snapshots,
                idle_suspensions=g.n_idle,
                allowance=allowance,
                level=_level(used, allowance),
            )
        )
        for user_id, username in students[g.pk]:
            mine = counted.student_hours(user_id)
            rows.append(
                ReportRow(
                    group_id=g.pk,
                    group=g.name,
                    student=username,
                    hours=mine,
                    allowance=allowance if course.hours_per_student else None,
                    level=_level(mine, allowance) if course.hours_per_student else "ok",
                )
            )
    return Report(
        course=course,
        rows=rows,
        chart=chart_of(counted),
        per_student=course.hours_per_student,
        total=sum(counted.group.values()) / 3600,
    )
