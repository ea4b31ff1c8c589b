"""Idle machines: a running VM nobody uses is warned about, then suspended to disk (or shut
down), by the course clock (docs/course-clock.md, "Idle machines").

A VM is **in use** when any of these holds, measured each minute (``idle_tick``, beat:
``labs.tasks.idle_tick``):

- a console session is open on it and is not view-only (``ConsoleSession``);
- someone is logged in inside the guest: the guest agent's ``guest-get-users`` reads
  utmp, so a console login or an interactive SSH session counts (``ssh vm cmd`` does not);
- its CPU time grew by more than ``Course.idle_cpu_percent`` of its vCPUs since the
  previous sample (``Vm.cpu_time_ns`` / ``cpu_sampled_at``, one sample a tick);
- **or we cannot tell**: a guest agent that does not answer, a host that does not answer,
  no CPU sample to compare with yet (the first tick after a start, a gap of more than
  ``SAMPLE_GAP``, a counter that went back because QEMU restarted). Stratus never suspends
  what it cannot see (docs/decisions.md).

The rule, for RUNNING VMs of approved groups in courses with ``idle_minutes > 0`` that are
not busy with another operation and not within ``Vm.keep_running_until``: ``idle_since``
is set the first tick a VM is seen idle and cleared the first tick it is seen in use. From
``idle_minutes - idle_warn_minutes`` after ``idle_since`` the group page warns (with a
Keep running button); at ``idle_minutes`` the clock asks for ``Course.idle_action`` (SAVE
or STOP), ``params={"clock": "idle"}``, shown as "by Course clock". Keep running
(``vm_keep_running``) clears ``idle_since`` and leaves the VM alone for ``idle_minutes``.
"""

from __future__ import annotations

import logging
import zoneinfo
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from labs import access
from labs.access import Action
from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    GroupStatus,
    IdleAction,
    ObservedState,
    OperationKind,
)
from labs.compute import dispatch, kinds, shares
from labs.drivers.base import HypervisorError
from labs.drivers.registry import driver_for
from labs.errors import Busy, NotAllowed, Refused, StratusError
from labs.live import events
from labs.models import ConsoleSession, Course, Operation, Vm

log = logging.getLogger(__name__)

SAMPLE_GAP = timedelta(minutes=5)  # an older CPU sample says nothing about the last minute
AGENT_SECONDS = 3  # one guest-get-users; an agent that takes longer counts as "in use"
CLOCK_PARAM = "idle"  # params["clock"] of the operations the idle rule asks for


@dataclass(frozen=True)
class Seen:
    """One VM's signals at one tick; ``reason`` is why it is in use, "" when idle."""

    vm: Vm
    reason: str

    @property
    def in_use(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class IdleWarning:
    """What the group page says about a VM idle long enough to be warned about."""

    vm: Vm
    idle_for: timedelta
    acts_at: datetime  # in the course's time zone
    action: str  # IdleAction

    @property
    def text(self) -> str:
        verb = "suspended" if self.action == IdleAction.SAVE else "shut down"
        minutes = int(self.idle_for.total_seconds() // 60)
        return (
            f"{self.vm.name} has been idle for {minutes} min: "
            f"it will be {verb} at {self.acts_at:%H:%M}"
        )


def warn_after(course: Course) -> timedelta:
    return timedelta(minutes=max(course.idle_minutes - course.idle_warn_minutes, 0))


def warning_of(vm: Vm, *, now: datetime | None = None) -> IdleWarning | None:
    """The idle warning of ``vm`` at ``now``, or None (not idle long enough, not running,
    the rule off for its course)."""
    course = vm.group.course
    if (
        vm.idle_since is None
        or course.idle_minutes == 0
        or vm.observed_state != ObservedState.RUNNING
    ):
        return None
    now = now or timezone.now()
    idle_for = now - vm.idle_since
    if idle_for < warn_after(course):
        return None
    acts_at = vm.idle_since + timedelta(minutes=course.idle_minutes)
    return IdleWarning(
        vm=vm,
        idle_for=idle_for,
        acts_at=max(acts_at, now).astimezone(zoneinfo.ZoneInfo(course.time_zone)),
        action=course.idle_action,
    )


def candidates():
    """The VMs the idle rule looks at: running, of approved groups, placed, in courses
    with the rule on."""
    return (
        Vm.objects.live()
        .filter(
            observed_state=ObservedState.RUNNING,
            group__status=GroupStatus.APPROVED,
            group__course__idle_minutes__gt=0,
            host__isnull=False,
        )
        .select_related("group__course", "host")
        .order_by("pk")
    )


def cpu_percent(vm: Vm, *, cpu_ns: int, now: datetime) -> float | None:
    """The VM's CPU use since its stored sample, in percent of its vCPUs; None when the
    sample cannot be compared (none, too old, a counter that went back)."""
    if vm.cpu_time_ns is None or vm.cpu_sampled_at is None:
        return None
    elapsed = (now - vm.cpu_sampled_at).total_seconds()
    if elapsed <= 0 or elapsed > SAMPLE_GAP.total_seconds() or cpu_ns < vm.cpu_time_ns:
        return None
    return (cpu_ns - vm.cpu_time_ns) / (elapsed * 1e9 * max(vm.vcpus, 1)) * 100


def vms_observe(vms: list[Vm], *, now: datetime) -> list[Seen]:
    """Measure every VM's signals (one CPU round trip per host, the guest agent only of a
    VM the cheaper signals found idle) and store the new CPU samples."""
    consoles = set(
        ConsoleSession.objects.filter(
            vm__in=[vm.pk for vm in vms], ended_at__isnull=True, view_only=False
        ).values_list("vm_id", flat=True)
    )
    by_host = defaultdict(list)
    for vm in vms:
        by_host[vm.host].append(vm)
    seen = []
    for host, its_vms in by_host.items():
        driver = driver_for(host)
        try:
            times = driver.cpu_times()
        except HypervisorError as error:
            log.info("idle: host %s did not answer (%s): its VMs count as in use", host, error)
            seen += [Seen(vm, "its host did not answer") for vm in its_vms]
            continue
        for vm in its_vms:
            cpu_ns = times.get(str(vm.uuid))
            percent = None if cpu_ns is None else cpu_percent(vm, cpu_ns=cpu_ns, now=now)
            if cpu_ns is not None:
                Vm.objects.filter(pk=vm.pk).update(cpu_time_ns=cpu_ns, cpu_sampled_at=now)
            seen.append(Seen(vm, _reason(vm, driver, vm.pk in consoles, percent)))
    return seen


def _reason(vm: Vm, driver, console: bool, percent: float | None) -> str:
    if console:
        return "a console is open"
    if percent is None:
        return "no CPU sample to compare with yet"
    if percent >= vm.group.course.idle_cpu_percent:
        return f"CPU at {percent:.0f}%"
    users = driver.guest_users(vm.domain_name, timeout=AGENT_SECONDS)
    if users is None:
        return "its guest agent did not answer"
    if users:
        return f"logged in: {', '.join(users)}"
    return ""


def idle_tick(*, now: datetime | None = None) -> list[Operation]:
    """Beat, every minute: measure, keep ``idle_since``, warn, and ask for the idle action
    of VMs idle for their course's ``idle_minutes``. Returns the operations asked for."""
    now = now or timezone.now()
    vms = list(candidates())
    # A VM that left the rule (stopped, suspended, its course's rule off) starts afresh.
    Vm.objects.filter(idle_since__isnull=False).exclude(pk__in=[vm.pk for vm in vms]).update(
        idle_since=None
    )
    busy = set(
        Vm.objects.filter(
            pk__in=[vm.pk for vm in vms], operations__status__in=ACTIVE_OPERATION_STATUSES
        ).values_list("pk", flat=True)
    )
    asked = []
    for seen in vms_observe(vms, now=now):
        vm = seen.vm
        if vm.pk in busy or (vm.keep_running_until and now < vm.keep_running_until):
            continue
        if seen.in_use:
            if vm.idle_since is not None:
                was_warned = warning_of(vm, now=now) is not None
                Vm.objects.filter(pk=vm.pk).update(idle_since=None)
                log.info("idle: %s is in use again (%s)", vm, seen.reason)
                if was_warned:  # the warning goes away on open pages
                    events.vm_changed(vm=vm)
            continue
        op = _step(vm, now=now)
        if op is not None:
            asked.append(op)
    return asked


def _step(vm: Vm, *, now: datetime) -> Operation | None:
    """One idle VM one tick further: mark it, warn once, or ask for the idle action."""
    course = vm.group.course
    previous = vm.cpu_sampled_at  # the last tick's time, for "did the warning just start"
    if vm.idle_since is None:
        vm.idle_since = now
        Vm.objects.filter(pk=vm.pk).update(idle_since=now)
        log.info("idle: %s is idle from now", vm)
    idle_for = now - vm.idle_since
    if idle_for >= timedelta(minutes=course.idle_minutes):
        return _act(vm, idle_for=idle_for)
    warned_before = previous is not None and previous - vm.idle_since >= warn_after(course)
    if idle_for >= warn_after(course) and not warned_before:
        log.info("idle: %s warned (idle for %s)", vm, idle_for)
        events.vm_changed(vm=vm)
    return None


def _act(vm: Vm, *, idle_for: timedelta) -> Operation | None:
    kind = (
        OperationKind.STOP
        if vm.group.course.idle_action == IdleAction.STOP
        else shares.save_kind(vm)  # a VM with shares is shut down: QEMU cannot save it
    )
    entry = kinds.kind_of(kind)
    refused = kinds.refusal(entry, vm, active=None)
    if refused is not None:
        log.info("idle: %s %s skipped: %s", kind, vm, refused)
        return None
    try:
        op = dispatch.operation_create(
            vm=vm,
            kind=kind,
            by=None,
            params={"clock": CLOCK_PARAM, "idle_minutes": int(idle_for.total_seconds() // 60)},
        )
    except Busy as error:  # an operation started since the tick looked
        log.info("idle: %s; trying again next tick", error)
        return None
    except StratusError as error:
        log.info("idle: %s %s skipped: %s", kind, vm, error)
        return None
    # Whatever happens next, the VM starts a fresh idle period when it runs again.
    Vm.objects.filter(pk=vm.pk).update(idle_since=None)
    log.info("idle: %s asked for %s after %s idle (operation %s)", vm, kind, idle_for, op.pk)
    return op


def vm_keep_running(*, vm: Vm, by, now: datetime | None = None) -> datetime:
    """A member's "Keep running": the idle rule leaves ``vm`` alone for its course's
    ``idle_minutes`` from now (its idle time starts again afterwards). NotAllowed unless
    ``by`` may operate ``vm`` (labs.access), Refused unless it is running. Returns until
    when."""
    if not access.may(by, Action.OPERATE, vm):
        raise NotAllowed("Only the group's members and course staff operate its VMs.")
    if vm.observed_state != ObservedState.RUNNING:
        raise Refused(f"{vm.name} is not running.")
    now = now or timezone.now()
    until = now + timedelta(minutes=vm.group.course.idle_minutes)
    Vm.objects.filter(pk=vm.pk).update(keep_running_until=until, idle_since=None)
    vm.keep_running_until, vm.idle_since = until, None
    log.info(
        "idle: %s kept running until %s by %s",
        vm,
        until.isoformat(),
        getattr(by, "username", by),
        extra={"event": "vm_keep_running", "vm_id": vm.pk, "user_id": getattr(by, "pk", None)},
    )
    events.vm_changed(vm=vm)
    return until


def kept_until(vm: Vm, *, now: datetime | None = None) -> str:
    """ "15:13" (the course's zone) while a Keep running holds, else ""."""
    now = now or timezone.now()
    if vm.keep_running_until is None or now >= vm.keep_running_until:
        return ""
    zone = zoneinfo.ZoneInfo(vm.group.course.time_zone)
    return f"{vm.keep_running_until.astimezone(zone):%H:%M}"
