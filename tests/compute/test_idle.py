"""Idle machines (labs/compute/idle.py): the signals, the rule each minute, the warning on
the group page with its Keep running button, and Resume of a VM suspended to disk.

Time is travelled with time-machine. The hypervisor is a small stand-in for the two driver
methods the rule reads (CPU times, guest users); those methods themselves run against
libvirt's test driver in tests/drivers/test_libvirt_idle.py. Operations are requested for
real (rows through dispatch, deliveries recorded by the ``sent`` fixture).
"""

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from celery import current_app
from django.test import Client
from django.urls import reverse

from labs.choices import ClockPhase, IdleAction, ObservedState, OperationKind, OperationStatus
from labs.compute import clock, idle
from labs.models import ConsoleSession, Course, Operation, Vm
from labs.tasks import idle_tick

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)  # 13:00 in Berlin


class Hypervisor:
    """What the idle rule asks a host: CPU time per domain uuid, who is logged in."""

    def __init__(self):
        self.cpu: dict[str, int] = {}
        self.users: dict[str, list[str] | None] = {}
        self.down = False

    def cpu_times(self) -> dict[str, int]:
        if self.down:
            from labs.drivers.base import HypervisorUnavailable

            raise HypervisorUnavailable("host h1 is down")
        return dict(self.cpu)

    def guest_users(self, name: str, *, timeout: float = 5) -> list[str] | None:
        return self.users.get(name, [])

    def burn(self, vm: Vm, *, seconds: float) -> None:
        """The VM used ``seconds`` of CPU since the last look."""
        self.cpu[str(vm.uuid)] = self.cpu.get(str(vm.uuid), 0) + int(seconds * 1e9)


@pytest.fixture
def hv(monkeypatch):
    hypervisor = Hypervisor()
    monkeypatch.setattr(idle, "driver_for", lambda host: hypervisor)
    return hypervisor


@pytest.fixture
def idle_course(course) -> Course:
    Course.objects.filter(pk=course.pk).update(
        time_zone="Europe/Berlin", idle_minutes=60, idle_warn_minutes=10, idle_cpu_percent=5
    )
    course.refresh_from_db()
    return course


@pytest.fixture
def vm(idle_course, group_a, make_vm, hv) -> Vm:
    vm = make_vm(group_a, name="vm1")
    hv.cpu[str(vm.uuid)] = 10**12
    return vm


def tick(at: datetime) -> list[Operation]:
    """The beat task at ``at``, through Celery's apply as beat's worker runs it."""
    before = set(Operation.objects.values_list("pk", flat=True))
    with time_machine.travel(at, tick=False):
        idle_tick.apply().get()
    return list(Operation.objects.exclude(pk__in=before).order_by("pk"))


def ticks(start: datetime, minutes: int, hv=None, vm=None, cpu_seconds=0.0) -> list[Operation]:
    """One tick a minute for ``minutes`` minutes from ``start`` (inclusive of both ends),
    the VM using ``cpu_seconds`` of CPU each minute."""
    asked = []
    for minute in range(minutes + 1):
        if hv is not None and cpu_seconds:
            hv.burn(vm, seconds=cpu_seconds)
        asked += tick(start + timedelta(minutes=minute))
    return asked


def fresh(vm: Vm) -> Vm:
    return Vm.objects.get(pk=vm.pk)


# --- the rule ----------------------------------------------------------------------------


def test_an_unused_vm_is_suspended_to_disk_by_the_course_clock_after_the_idle_time(vm, sent):
    # Minute 0 takes the first CPU sample (nothing to compare with: in use); from minute 1
    # the VM is idle, so at minute 61 it has been idle for 60 minutes.
    assert ticks(T0, 60) == []
    assert fresh(vm).idle_since == T0 + timedelta(minutes=1)
    [op] = tick(T0 + timedelta(minutes=61))
    assert (op.vm_id, op.kind, op.requester, op.params["clock"]) == (
        vm.pk,
        OperationKind.SAVE,
        "Course clock",
        "idle",
    )
    assert sent == [op.pk]
    assert fresh(vm).idle_since is None  # it starts a fresh idle period when it runs again


def test_a_course_whose_idle_action_is_stop_has_idle_vms_shut_down(vm, idle_course, sent):
    Course.objects.filter(pk=idle_course.pk).update(idle_action=IdleAction.STOP, idle_minutes=5)
    ops = ticks(T0, 6)
    assert [op.kind for op in ops] == [OperationKind.STOP]


@pytest.mark.parametrize(
    ("signal", "reason"),
    [
        ("ssh", "logged in: alice"),
        ("agent_silent", "its guest agent did not answer"),
        ("console", "a console is open"),
        ("cpu", "CPU at 10%"),
        ("host_down", "its host did not answer"),
    ],
)
def test_a_vm_in_use_by_any_signal_is_never_idle(vm, hv, alice, sent, signal, reason):
    if signal == "ssh":
        hv.users[vm.domain_name] = ["alice"]
    elif signal == "agent_silent":
        hv.users[vm.domain_name] = None
    elif signal == "console":
        ConsoleSession.objects.create(vm=vm, user=alice)
    elif signal == "host_down":
        hv.down = True
    busy = 6.0 if signal == "cpu" else 0.0  # 6 s of a 60 s minute on one vCPU: 10 %
    assert ticks(T0, 70, hv=hv, vm=vm, cpu_seconds=busy) == []
    assert fresh(vm).idle_since is None
    seen = idle.vms_observe([fresh(vm)], now=T0 + timedelta(minutes=71, seconds=0))
    if signal == "cpu":  # the stand-in's CPU stood still since the last tick
        return
    assert [s.reason for s in seen] == [reason]


def test_cpu_is_measured_against_all_vcpus_of_the_vm(vm, hv, sent):
    Vm.objects.filter(pk=vm.pk).update(vcpus=4)
    # 6 s a minute over 4 vCPUs is 2.5 %: below 5 %, so idle.
    assert ticks(T0, 61, hv=hv, vm=vm, cpu_seconds=6.0)[0].kind == OperationKind.SAVE


def test_an_observer_in_view_only_mode_does_not_keep_a_vm_running(vm, ines, sent):
    ConsoleSession.objects.create(vm=vm, user=ines, view_only=True)
    assert [op.kind for op in ticks(T0, 61)] == [OperationKind.SAVE]


def test_using_the_vm_again_clears_its_idle_time(vm, hv, sent):
    ticks(T0, 30)
    assert fresh(vm).idle_since is not None
    hv.users[vm.domain_name] = ["bob"]
    tick(T0 + timedelta(minutes=31))
    assert fresh(vm).idle_since is None
    hv.users[vm.domain_name] = []
    # Idle again from minute 32: not acted on at minute 61, at minute 92.
    assert ticks(T0 + timedelta(minutes=32), 59) == []
    assert [op.kind for op in tick(T0 + timedelta(minutes=92))] == [OperationKind.SAVE]


def test_a_gap_in_the_samples_starts_the_measurement_again(vm, sent):
    ticks(T0, 10)
    assert fresh(vm).idle_since is not None
    tick(T0 + timedelta(minutes=20))  # beat was away for 10 minutes: no judgement
    assert fresh(vm).idle_since is None


def test_busy_vms_vms_of_courses_with_the_rule_off_and_stopped_vms_are_left_alone(
    vm, idle_course, group_b, make_vm, hv, sent
):
    stopped = make_vm(group_b, name="vm2", observed_state=ObservedState.SHUTOFF)
    Vm.objects.filter(pk=stopped.pk).update(idle_since=T0 - timedelta(hours=5))
    Operation.objects.create(vm=vm, kind=OperationKind.SNAPSHOT, status=OperationStatus.RUNNING)
    assert ticks(T0, 70) == []
    assert fresh(stopped).idle_since is None  # it starts afresh when it runs again
    Operation.objects.filter(vm=vm).update(status=OperationStatus.SUCCEEDED)
    Course.objects.filter(pk=idle_course.pk).update(idle_minutes=0)
    Vm.objects.filter(pk=vm.pk).update(idle_since=T0)
    assert ticks(T0 + timedelta(minutes=71), 70) == []
    assert fresh(vm).idle_since is None


def test_the_beat_schedule_runs_the_idle_tick_every_minute():
    entry = current_app.conf.beat_schedule["idle"]
    assert entry["task"] == "labs.tasks.idle_tick"
    assert entry["schedule"] == 60


def test_open_pages_hear_once_when_a_warning_starts_and_when_it_ends(vm, hv, monkeypatch):
    published = []
    monkeypatch.setattr(idle.events, "vm_changed", lambda vm: published.append(vm.pk))
    ticks(T0, 55)
    assert published == [vm.pk]  # at minute 51: idle for 50 minutes
    hv.users[vm.domain_name] = ["alice"]
    tick(T0 + timedelta(minutes=56))
    assert published == [vm.pk, vm.pk]


# --- the group page and Keep running -----------------------------------------------------


def page(client, group, at: datetime) -> str:
    with time_machine.travel(at, tick=False):
        return client.get(reverse("labs:group_detail", args=[group.pk])).content.decode()


def test_members_see_the_warning_with_the_time_in_the_course_zone(vm, client_for, alice, group_a):
    ticks(T0, 50)
    assert "has been idle" not in page(client_for(alice), group_a, T0 + timedelta(minutes=50))
    ticks(T0 + timedelta(minutes=51), 0)
    text = page(client_for(alice), group_a, T0 + timedelta(minutes=51))
    # idle since 12:01 UTC, acted on at 13:01 UTC: 14:01 in Berlin.
    assert "vm1 has been idle for 50 min: it will be suspended at 14:01" in text
    assert reverse("labs:vm_keep_running", args=[vm.pk]) in text


def test_keep_running_leaves_the_vm_alone_for_the_idle_time(vm, client_for, bob, group_a, sent):
    ticks(T0, 52)
    with time_machine.travel(T0 + timedelta(minutes=53), tick=False):
        response = client_for(bob).post(reverse("labs:vm_keep_running", args=[vm.pk]))
    assert response.status_code == 302
    assert fresh(vm).keep_running_until == T0 + timedelta(minutes=113)
    assert fresh(vm).idle_since is None
    text = page(client_for(bob), group_a, T0 + timedelta(minutes=54))
    assert "has been idle" not in text
    assert "not suspended for being idle before 14:53" in text  # 13:53 UTC, in Berlin
    # Left alone until minute 113; idle afresh from then: acted on at minute 173.
    assert ticks(T0 + timedelta(minutes=54), 118) == []
    assert [op.kind for op in tick(T0 + timedelta(minutes=173))] == [OperationKind.SAVE]


def test_keep_running_is_refused_to_others_and_needs_the_csrf_token(
    vm, client_for, carol, alice, client
):
    url = reverse("labs:vm_keep_running", args=[vm.pk])
    assert client.post(url).status_code == 302  # anonymous: to the sign-in page
    assert "login" in client.post(url)["Location"]
    assert client_for(carol).post(url).status_code == 404  # another group's VM
    assert client_for(carol).get(url).status_code == 405
    guarded = Client(enforce_csrf_checks=True)
    guarded.force_login(alice)
    assert guarded.post(url).status_code == 403
    assert fresh(vm).keep_running_until is None


def test_course_staff_may_keep_a_vm_running_and_a_stopped_vm_is_refused(
    vm, client_for, ines, alice, group_a
):
    url = reverse("labs:vm_keep_running", args=[vm.pk])
    client_for(ines).post(url)
    assert fresh(vm).keep_running_until is not None
    Vm.objects.filter(pk=vm.pk).update(
        observed_state=ObservedState.SHUTOFF, keep_running_until=None
    )
    response = client_for(alice).post(url, follow=True)
    assert "vm1 is not running." in response.content.decode()
    assert fresh(vm).keep_running_until is None


# --- suspended to disk: Resume ------------------------------------------------------------


def test_a_vm_suspended_to_disk_shows_so_and_offers_resume_not_start(
    vm, client_for, alice, group_a
):
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SAVED)
    text = page(client_for(alice), group_a, T0)
    assert "Suspended to disk" in text
    assert reverse("labs:vm_operation", args=[vm.pk, "resume"]) in text
    assert reverse("labs:vm_operation", args=[vm.pk, "start"]) not in text


def test_the_console_of_a_saved_vm_offers_resume_and_a_get_changes_nothing(
    vm, client_for, alice, sent
):
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SAVED)
    client = client_for(alice)
    text = client.get(reverse("labs:vm_console", args=[vm.pk])).content.decode()
    assert 'id="console-resume"' in text
    assert Operation.objects.count() == 0
    response = client.post(
        reverse("labs:vm_operation", args=[vm.pk, "resume"]), {"then": "console"}
    )
    assert response["Location"] == reverse("labs:vm_console", args=[vm.pk])
    [op] = Operation.objects.all()
    assert (op.kind, op.requested_by) == (OperationKind.RESUME, alice)


def test_the_course_clock_resumes_a_saved_vm_before_class(idle_course):
    assert clock._want(idle_course, ClockPhase.BEFORE, ObservedState.SAVED) == OperationKind.RESUME
    assert clock._want(idle_course, ClockPhase.AFTER, ObservedState.SAVED) is None
