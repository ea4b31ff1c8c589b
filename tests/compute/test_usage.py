"""Usage hours (labs/compute/usage.py): running time from the state history, class time
subtracted, per student by who started it; the quota's warning, saves and refusals.

State histories are written as rows (what labs/compute/records.py appends); operations
are requested for real (rows through dispatch, deliveries recorded by ``sent``), no
hypervisor involved.
"""

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from celery import current_app

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute import requests, usage
from labs.errors import OverQuota
from labs.models import ClassSession, Course, Group, Operation, StateChange

pytestmark = pytest.mark.django_db

BERLIN = ZoneInfo("Europe/Berlin")
S = ObservedState


def berlin(*args) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def term(course) -> Course:
    """The course in Berlin, created on 1 March 2026, class time free (the default)."""
    Course.objects.filter(pk=course.pk).update(
        time_zone="Europe/Berlin", created_at=utc(2026, 3, 1)
    )
    return Course.objects.get(pk=course.pk)


def history(vm, *rows) -> None:
    """(state, at[, started_by]) rows of a VM's state history."""
    for state, at, *by in rows:
        StateChange.objects.create(vm=vm, state=state, at=at, started_by=by[0] if by else None)


def fresh(course) -> Course:
    return Course.objects.get(pk=course.pk)


# --- what counts ------------------------------------------------------------------------------


def test_only_running_stretches_count_and_an_open_one_runs_to_now(term, group_a, make_vm):
    vm = make_vm(group_a)
    history(
        vm,
        (S.RUNNING, utc(2026, 3, 2, 8)),  # 2 h
        (S.PAUSED, utc(2026, 3, 2, 10)),  # paused: holds memory, no CPU
        (S.RUNNING, utc(2026, 3, 2, 11)),  # 1 h
        (S.SAVED, utc(2026, 3, 2, 12)),
        (S.RUNNING, utc(2026, 3, 2, 13)),  # 30 min
        (S.UNKNOWN, utc(2026, 3, 2, 13, 30)),  # the host did not answer: not charged
        (S.RUNNING, utc(2026, 3, 2, 16)),  # open: 4 h to "now"
    )
    counted = usage.usage_count(course=term, now=utc(2026, 3, 2, 20))
    assert counted.vm[vm.pk] / 3600 == pytest.approx(7.5)
    assert counted.group_hours(group_a.pk) == pytest.approx(7.5)
    assert counted.running_by == {vm.pk: None}


def test_two_vms_of_a_group_add_up_and_another_groups_vm_counts_apart(
    term, group_a, group_b, make_vm
):
    a1, a2 = make_vm(group_a, name="vm1"), make_vm(group_a, name="vm2")
    b1 = make_vm(group_b)
    history(a1, (S.RUNNING, utc(2026, 3, 2, 8)), (S.SHUTOFF, utc(2026, 3, 2, 9)))
    history(a2, (S.RUNNING, utc(2026, 3, 2, 8)), (S.SHUTOFF, utc(2026, 3, 2, 11)))
    history(b1, (S.RUNNING, utc(2026, 3, 2, 8)), (S.CRASHED, utc(2026, 3, 2, 8, 45)))
    counted = usage.usage_count(course=term, now=utc(2026, 3, 3))
    assert counted.group_hours(group_a.pk) == pytest.approx(4)
    assert counted.group_hours(group_b.pk) == pytest.approx(0.75)
    assert usage.usage_count(course=term, group=group_b, now=utc(2026, 3, 3)).group == {
        group_b.pk: pytest.approx(0.75 * 3600)
    }


def test_class_time_is_subtracted_exactly_with_overlapping_classes(term, group_a, make_vm):
    # Tuesday 3 March 2026: classes 10:00–11:30 and 11:00–12:00 local (one window 10–12).
    for start, end in ((time(10), time(11, 30)), (time(11), time(12))):
        ClassSession.objects.create(course=term, weekday=1, starts_at=start, ends_at=end)
    vm = make_vm(group_a)
    history(
        vm,
        (S.RUNNING, berlin(2026, 3, 3, 9)),  # 9–13 local: 4 h, 2 of them in class
        (S.SHUTOFF, berlin(2026, 3, 3, 13)),
        (S.RUNNING, berlin(2026, 3, 3, 10, 30)),  # inside class only (history out of
        (S.SHUTOFF, berlin(2026, 3, 3, 11, 45)),  # order on purpose: rows sort by time)
    )
    counted = usage.usage_count(course=fresh(term), now=utc(2026, 3, 4))
    # Rows sort as 9 RUNNING, 10:30 RUNNING, 11:45 SHUTOFF, 13 SHUTOFF: 9–10:30 and
    # 10:30–11:45 run, 11:45–13 does not; class 10–12 free: 1 h counts.
    assert counted.vm[vm.pk] / 3600 == pytest.approx(1)

    Course.objects.filter(pk=term.pk).update(hours_exclude_class=False)
    assert usage.usage_count(course=fresh(term), now=utc(2026, 3, 4)).vm[
        vm.pk
    ] / 3600 == pytest.approx(2.75)


def test_interval_subtraction_keeps_what_is_outside_every_hole():
    holes = usage._merged(
        [
            (utc(2026, 1, 1, 10), utc(2026, 1, 1, 11)),
            (utc(2026, 1, 1, 10, 30), utc(2026, 1, 1, 12)),  # overlaps the first
            (utc(2026, 1, 1, 14), utc(2026, 1, 1, 15)),
            (utc(2026, 1, 1, 20), utc(2026, 1, 1, 21)),  # after the stretch
        ]
    )
    assert holes[0] == (utc(2026, 1, 1, 10), utc(2026, 1, 1, 12))
    pieces = usage.minus(utc(2026, 1, 1, 9), utc(2026, 1, 1, 16), holes)
    assert pieces == [
        (utc(2026, 1, 1, 9), utc(2026, 1, 1, 10)),
        (utc(2026, 1, 1, 12), utc(2026, 1, 1, 14)),
        (utc(2026, 1, 1, 15), utc(2026, 1, 1, 16)),
    ]
    assert usage.minus(utc(2026, 1, 1, 10, 15), utc(2026, 1, 1, 11), holes) == []


def test_hours_across_a_daylight_saving_change_are_real_hours_and_the_class_local(
    term, group_a, make_vm
):
    # Sunday 29 March 2026, 02:00 local becomes 03:00: a class "02:30–04:00" that day
    # starts at 03:30 (the clock shifts the skipped time forward): 30 minutes.
    ClassSession.objects.create(
        course=term, date=date(2026, 3, 29), starts_at=time(2, 30), ends_at=time(4)
    )
    # Sunday 25 October 2026, 03:00 local is 02:00 again: a 25-hour day.
    vm = make_vm(group_a)
    history(
        vm,
        (S.RUNNING, berlin(2026, 3, 29, 0)),
        (S.SHUTOFF, berlin(2026, 3, 29, 6)),  # 5 real hours, 30 min of them class
        (S.RUNNING, berlin(2026, 10, 25, 0)),
        (S.SHUTOFF, berlin(2026, 10, 25, 6)),  # 7 real hours
    )
    counted = usage.usage_count(course=fresh(term), now=utc(2026, 11, 1), by_day=True)
    assert counted.vm[vm.pk] / 3600 == pytest.approx(4.5 + 7)
    assert counted.day[date(2026, 3, 29)] / 3600 == pytest.approx(4.5)
    assert counted.day[date(2026, 10, 25)] / 3600 == pytest.approx(7)


def test_a_stretch_over_midnight_is_split_between_the_local_days(term, group_a, make_vm):
    vm = make_vm(group_a)
    history(vm, (S.RUNNING, berlin(2026, 3, 2, 22)), (S.SHUTOFF, berlin(2026, 3, 3, 1, 30)))
    counted = usage.usage_count(course=term, now=utc(2026, 3, 4), by_day=True)
    assert {d: s / 3600 for d, s in counted.day.items()} == {
        date(2026, 3, 2): pytest.approx(2),
        date(2026, 3, 3): pytest.approx(1.5),
    }


def test_a_student_is_charged_the_stretches_they_started(term, group_a, make_vm, alice, bob, ines):
    vm = make_vm(group_a)
    history(
        vm,
        (S.RUNNING, utc(2026, 3, 2, 8), alice),  # 1 h alice
        (S.SHUTOFF, utc(2026, 3, 2, 9)),
        (S.RUNNING, utc(2026, 3, 2, 10), bob),  # 2 h bob
        (S.PAUSED, utc(2026, 3, 2, 12)),
        (S.RUNNING, utc(2026, 3, 2, 13), ines),  # 1 h staff: the group's only
        (S.SHUTOFF, utc(2026, 3, 2, 14)),
        (S.RUNNING, utc(2026, 3, 2, 15)),  # 1 h the clock's
        (S.SHUTOFF, utc(2026, 3, 2, 16)),
    )
    counted = usage.usage_count(course=term, now=utc(2026, 3, 3))
    assert counted.student_hours(alice.pk) == pytest.approx(1)
    assert counted.student_hours(bob.pk) == pytest.approx(2)
    assert counted.group_hours(group_a.pk) == pytest.approx(5)


def test_a_course_is_counted_in_one_query_for_its_history_however_many_groups(
    term, group_a, group_b, make_vm, django_assert_num_queries
):
    for group in (group_a, group_b):
        for name in ("vm1", "vm2"):
            vm = make_vm(group, name=name)
            history(vm, (S.RUNNING, utc(2026, 3, 2, 8)), (S.SHUTOFF, utc(2026, 3, 2, 9)))
    course = fresh(term)
    with django_assert_num_queries(3):  # the history, the classes, the holidays
        counted = usage.usage_count(course=course, now=utc(2026, 3, 3))
    assert sum(counted.group.values()) / 3600 == pytest.approx(4)


# --- the quota: refusals -------------------------------------------------------------------------


def over_quota(course, group, vm, *, by=None, hours=40, quota=40, per_student=False):
    """The group ran ``hours`` hours (started by ``by``) before 2 March 2026 12:00 UTC."""
    Course.objects.filter(pk=course.pk).update(hours_quota=quota, hours_per_student=per_student)
    history(
        vm,
        (S.RUNNING, utc(2026, 3, 2, 12) - timedelta(hours=hours), by),
        (S.SHUTOFF, utc(2026, 3, 2, 12)),
    )
    vm.observed_state = S.SHUTOFF
    vm.save(update_fields=["observed_state"])


NOW = utc(2026, 3, 2, 13)


def test_a_student_of_a_group_past_its_hours_may_not_start_a_vm_but_staff_may(
    term, group_a, make_vm, alice, ines, sent
):
    vm = make_vm(group_a)
    over_quota(term, group_a, vm)
    with time_machine.travel(NOW, tick=False):
        with pytest.raises(OverQuota) as refused:
            requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=alice)
        assert refused.value.message == (
            "Your group has used its 40 h for this term; ask your instructor for more hours."
        )
        op = requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=ines)
    assert op.kind == OperationKind.START and op.requested_by == ines


def test_extra_hours_let_the_group_start_again(term, group_a, make_vm, alice, sent):
    vm = make_vm(group_a)
    over_quota(term, group_a, vm)
    Group.objects.filter(pk=group_a.pk).update(extra_hours=5)
    with time_machine.travel(NOW, tick=False):
        op = requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=alice)
    assert op.status == OperationStatus.QUEUED


def test_a_course_without_hours_never_refuses(term, group_a, make_vm, alice, sent):
    vm = make_vm(group_a)
    over_quota(term, group_a, vm, hours=400, quota=None)
    with time_machine.travel(NOW, tick=False):
        assert requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=alice)


def test_counted_each_a_student_past_their_own_hours_is_refused_and_a_teammate_not(
    term, group_a, group_b, make_vm, alice, bob, sent
):
    """A student's hours are their own stretches across the course: here alice ran 30 h
    in the group she was in before (Bravo), and Alpha itself ran none."""
    vm, before = make_vm(group_a), make_vm(group_b)
    Course.objects.filter(pk=term.pk).update(hours_quota=10, hours_per_student=True)
    Group.objects.filter(pk=group_a.pk).update(extra_hours=20)  # Alpha: 30 h
    history(before, (S.RUNNING, utc(2026, 3, 1, 6), alice), (S.SHUTOFF, utc(2026, 3, 2, 12)))
    vm.observed_state = S.SHUTOFF
    vm.save(update_fields=["observed_state"])
    with time_machine.travel(NOW, tick=False):
        with pytest.raises(OverQuota) as refused:
            requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=alice)
        assert refused.value.message == (
            "You have used your 30 h for this term; ask your instructor for more hours."
        )
        assert requests.vm_operation_request(vm=vm, kind=OperationKind.START, by=bob)


# --- the quota: the beat task ------------------------------------------------------------------


@pytest.fixture
def published(monkeypatch):
    """The groups whose change was published to the pages."""
    from labs.live import events

    ids = []
    monkeypatch.setattr(events, "group_changed", lambda *, group: ids.append(group.pk))
    return ids


def running_for(course, vm, *, hours, by=None, quota=40, **fields):
    """``vm`` runs, started ``hours`` hours before NOW (by ``by``)."""
    Course.objects.filter(pk=course.pk).update(hours_quota=quota, **fields)
    history(vm, (S.RUNNING, NOW - timedelta(hours=hours), by))


def tick() -> list[Operation]:
    with time_machine.travel(NOW, tick=False):
        return usage.usage_tick()


def test_at_80_percent_the_group_is_warned_once_and_its_page_told(
    term, group_a, group_b, make_vm, published, sent
):
    running_for(term, make_vm(group_a), hours=33)  # 33 of 40: 82 %
    running_for(term, make_vm(group_b), hours=20)
    assert tick() == []
    group_a.refresh_from_db()
    assert group_a.hours_warned_at == NOW
    assert Group.objects.get(pk=group_b.pk).hours_warned_at is None
    assert published == [group_a.pk]
    tick()
    assert published == [group_a.pk]  # once


def test_at_100_percent_running_vms_are_saved_to_disk_by_the_hours_clock_except_busy_ones(
    term, group_a, group_b, make_vm, sent
):
    vm1, vm2, busy = (make_vm(group_a, name=n) for n in ("vm1", "vm2", "vm3"))
    running_for(term, vm1, hours=30)
    running_for(term, vm2, hours=11)  # 41 of 40 h
    running_for(term, busy, hours=0.1)
    Operation.objects.create(vm=busy, kind=OperationKind.SNAPSHOT)  # queued: busy
    other = make_vm(group_b)
    running_for(term, other, hours=5)
    saved = tick()
    assert [(op.vm_id, op.kind, op.params, op.requested_by) for op in saved] == [
        (vm1.pk, OperationKind.SAVE, {"clock": "hours"}, None),
        (vm2.pk, OperationKind.SAVE, {"clock": "hours"}, None),
    ]
    assert sorted(sent) == sorted(op.pk for op in saved)
    assert tick() == []  # the saves are in progress: nothing asked twice


def test_a_vm_course_staff_started_for_a_group_past_its_hours_stays_up(
    term, group_a, make_vm, ines, sent
):
    mine, theirs = make_vm(group_a, name="vm1"), make_vm(group_a, name="vm2")
    running_for(term, mine, hours=45)
    running_for(term, theirs, hours=1, by=ines)
    assert [op.vm_id for op in tick()] == [mine.pk]


def test_nothing_is_saved_during_a_class_that_does_not_count(term, group_a, make_vm, sent):
    # NOW is Monday 2 March 2026, 14:00 in Berlin.
    ClassSession.objects.create(course=term, weekday=0, starts_at=time(13), ends_at=time(15))
    running_for(term, make_vm(group_a), hours=60)
    assert tick() == []
    Course.objects.filter(pk=term.pk).update(hours_exclude_class=False)
    assert len(tick()) == 1


def test_counted_each_only_the_vms_the_student_past_their_hours_started_are_saved(
    term, group_a, group_b, make_vm, alice, bob, sent
):
    """alice ran 30 h in Bravo before she joined Alpha; Alpha's own hours are few."""
    old = make_vm(group_b, name="old", observed_state=S.SHUTOFF)
    history(
        old, (S.RUNNING, NOW - timedelta(hours=40), alice), (S.SHUTOFF, NOW - timedelta(hours=10))
    )
    hers, his = make_vm(group_a, name="vm1"), make_vm(group_a, name="vm2")
    running_for(term, hers, hours=1, by=alice, quota=30, hours_per_student=True)
    running_for(term, his, hours=1, by=bob, quota=30, hours_per_student=True)
    assert [op.vm_id for op in tick()] == [hers.pk]


def test_the_hours_are_a_beat_entry_every_five_minutes():
    import labs.tasks  # noqa: F401  (registers the tasks, as the worker does)

    app = current_app._get_current_object()
    entry = app.conf.beat_schedule["usage-hours"]
    assert entry["task"] == "labs.tasks.usage_tick" and entry["task"] in app.tasks
    assert entry["schedule"] == 300


def test_extra_hours_that_bring_a_warned_group_under_80_percent_let_it_be_warned_again(
    term, group_a, make_vm, published, sent
):
    running_for(term, make_vm(group_a), hours=33)
    tick()
    Group.objects.filter(pk=group_a.pk).update(extra_hours=20)  # 33 of 60 h: 55 %
    tick()
    assert Group.objects.get(pk=group_a.pk).hours_warned_at is None
    assert published == [group_a.pk]
