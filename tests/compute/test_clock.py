"""The course clock, class schedules: occurrences in the course's zone, windows, and the
beat task asking for start/resume before class and suspend/stop after, once each.

Time is travelled with time-machine; operations are requested for real (rows through
dispatch, deliveries recorded by the ``sent`` fixture), no hypervisor involved.
"""

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from celery import current_app
from celery.beat import Scheduler
from django.core.exceptions import ValidationError
from django.urls import reverse

from labs.choices import ClockAfter, ObservedState, OperationKind, OperationStatus
from labs.compute import clock, dispatch
from labs.models import ClassHoliday, ClassSession, ClockAction, ConsoleSession, Course, Operation
from labs.tasks import course_clock_tick

pytestmark = pytest.mark.django_db

BERLIN = ZoneInfo("Europe/Berlin")
TUESDAY = 1


def berlin(*args) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


@pytest.fixture
def berlin_course(course) -> Course:
    Course.objects.filter(pk=course.pk).update(time_zone="Europe/Berlin", clock_lead_minutes=10)
    course.refresh_from_db()
    return course


def weekly(course, start=(10, 0), end=(11, 30), weekday=TUESDAY, **fields) -> ClassSession:
    return ClassSession.objects.create(
        course=course, weekday=weekday, starts_at=time(*start), ends_at=time(*end), **fields
    )


def fresh(course) -> Course:
    """The course again, without the schedule cached on the instance."""
    return Course.objects.get(pk=course.pk)


def tick_at(moment: datetime) -> list[Operation]:
    """Run the beat task at ``moment`` (through Celery's apply, as beat's worker would);
    the operations it asked for."""
    before = set(Operation.objects.values_list("pk", flat=True))
    with time_machine.travel(moment, tick=False):
        course_clock_tick.apply().get()
    return list(Operation.objects.exclude(pk__in=before).order_by("pk"))


def operation_finish(op: Operation) -> None:
    Operation.objects.filter(pk=op.pk).update(status=OperationStatus.SUCCEEDED)


# --- occurrences and windows -----------------------------------------------------------------


def test_a_ten_oclock_class_stays_at_ten_local_across_both_daylight_saving_changes(
    berlin_course,
):
    weekly(berlin_course)
    march = clock.occurrences(
        berlin_course, berlin(2026, 3, 23).astimezone(UTC), berlin(2026, 4, 1)
    )
    october = clock.occurrences(berlin_course, berlin(2026, 10, 19), berlin(2026, 10, 28))
    starts = [start for start, _ in march + october]
    assert [(s.date(), s.hour, s.minute) for s in starts] == [
        (date(2026, 3, 24), 10, 0),
        (date(2026, 3, 31), 10, 0),
        (date(2026, 10, 20), 10, 0),
        (date(2026, 10, 27), 10, 0),
    ]
    # ... which is 09:00 UTC in winter time and 08:00 UTC in summer time.
    assert [s.astimezone(UTC).hour for s in starts] == [9, 8, 8, 9]


def test_a_class_in_the_skipped_hour_moves_forward_and_one_in_the_repeated_hour_takes_the_first(
    berlin_course,
):
    ClassSession.objects.create(
        course=berlin_course, date=date(2026, 3, 29), starts_at=time(2, 30), ends_at=time(4, 0)
    )
    ClassSession.objects.create(
        course=berlin_course, date=date(2026, 10, 25), starts_at=time(2, 30), ends_at=time(4, 0)
    )
    (spring, _), (autumn, _) = clock.occurrences(
        berlin_course, berlin(2026, 3, 1), berlin(2026, 11, 1)
    )
    assert (spring.hour, spring.minute, spring.astimezone(UTC).hour) == (3, 30, 1)
    assert (autumn.hour, autumn.minute, autumn.astimezone(UTC).hour) == (2, 30, 0)
    assert autumn.utcoffset() == timedelta(hours=2)  # the first 02:30, still summer time


def test_a_holiday_cancels_the_class_on_its_days_and_the_next_class_is_a_week_later(
    berlin_course,
):
    weekly(berlin_course)
    ClassHoliday.objects.create(
        course=berlin_course,
        first_day=date(2026, 3, 30),
        last_day=date(2026, 4, 3),
        label="Easter",
    )
    days = [
        s.date()
        for s, _ in clock.occurrences(berlin_course, berlin(2026, 3, 23), berlin(2026, 4, 10))
    ]
    assert days == [date(2026, 3, 24), date(2026, 4, 7)]
    after_monday = clock.next_window(berlin_course, berlin(2026, 3, 30, 8, 0))
    assert after_monday.start == berlin(2026, 4, 7, 10, 0)


def test_overlapping_and_touching_classes_are_one_window_and_a_later_class_another(
    berlin_course,
):
    weekly(berlin_course, (10, 0), (11, 30))
    weekly(berlin_course, (11, 0), (12, 0))
    weekly(berlin_course, (12, 0), (13, 0))
    weekly(berlin_course, (14, 0), (15, 0))
    found = clock.windows(berlin_course, berlin(2026, 3, 31), berlin(2026, 4, 1))
    assert [(w.start.hour, w.end.hour) for w in found] == [(10, 13), (14, 15)]


def test_a_weekly_class_meets_only_between_its_first_and_last_weeks(berlin_course):
    weekly(berlin_course, valid_from=date(2026, 3, 30), valid_until=date(2026, 4, 8))
    days = [
        s.date()
        for s, _ in clock.occurrences(berlin_course, berlin(2026, 3, 1), berlin(2026, 5, 1))
    ]
    assert days == [date(2026, 3, 31), date(2026, 4, 7)]


# --- the beat task -----------------------------------------------------------------------------


def test_the_clock_is_a_beat_entry_that_beat_finds_due_every_minute():
    app = current_app._get_current_object()
    entry = app.conf.beat_schedule["course-clock"]
    assert entry["task"] == "labs.tasks.course_clock_tick"
    assert entry["task"] in app.tasks
    scheduler = Scheduler(app, lazy=True)
    scheduler.merge_inplace(app.conf.beat_schedule)
    beat_entry = scheduler.schedule["course-clock"]
    with time_machine.travel(datetime(2026, 3, 31, 7, 0, tzinfo=UTC), tick=False):
        beat_entry.last_run_at = app.now()
        assert not beat_entry.is_due().is_due
    with time_machine.travel(datetime(2026, 3, 31, 7, 1, 1, tzinfo=UTC), tick=False):
        assert beat_entry.is_due().is_due


def test_stopped_vms_are_started_from_the_lead_time_on_by_the_course_clock_once(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course)
    vm = make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    assert tick_at(berlin(2026, 3, 31, 9, 49)) == []
    (op,) = tick_at(berlin(2026, 3, 31, 9, 50))
    assert (op.vm, op.kind, op.requested_by, op.status) == (
        vm,
        OperationKind.START,
        None,
        OperationStatus.QUEUED,
    )
    assert op.params["clock"] == berlin(2026, 3, 31, 10, 0).astimezone(UTC).isoformat()
    assert op.requester == "Course clock"
    assert sent == [op.pk]  # delivered to the workers like any other operation
    operation_finish(op)
    # A second tick (or a beat restarted within the minute) asks for nothing more, even
    # when the VM has been stopped again by someone meanwhile.
    assert tick_at(berlin(2026, 3, 31, 9, 50, 30)) == []
    assert tick_at(berlin(2026, 3, 31, 10, 15)) == []
    assert ClockAction.objects.filter(vm=vm).count() == 1


def test_a_suspended_vm_is_resumed_and_a_running_one_left_alone(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course)
    paused = make_vm(group_a, name="vm1", observed_state=ObservedState.PAUSED)
    make_vm(group_a, name="vm2", observed_state=ObservedState.RUNNING)
    ops = tick_at(berlin(2026, 3, 31, 9, 55))
    assert [(op.vm, op.kind) for op in ops] == [(paused, OperationKind.RESUME)]
    assert ClockAction.objects.count() == 2  # the running VM's "nothing to do" is decided too


def test_a_vm_busy_with_another_operation_is_skipped_then_handled_on_the_next_tick(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course)
    vm = make_vm(group_a, observed_state=ObservedState.PAUSED)
    snapshot = dispatch.operation_create(vm=vm, kind=OperationKind.SNAPSHOT, by=None)
    assert tick_at(berlin(2026, 3, 31, 9, 50)) == []
    assert not ClockAction.objects.exists()
    operation_finish(snapshot)
    (op,) = tick_at(berlin(2026, 3, 31, 9, 51))
    assert op.kind == OperationKind.RESUME


def test_after_class_running_vms_are_suspended_unless_a_member_is_in_the_console(
    berlin_course, group_a, group_b, make_vm, alice, sent
):
    weekly(berlin_course)
    idle = make_vm(group_a, name="vm1")
    watched = make_vm(group_b, name="vm1")
    console = ConsoleSession.objects.create(vm=watched, user=alice)
    assert tick_at(berlin(2026, 3, 31, 11, 29)) == []
    ops = tick_at(berlin(2026, 3, 31, 11, 30))
    assert [(op.vm, op.kind, op.requester) for op in ops] == [
        (idle, OperationKind.SUSPEND, "Course clock")
    ]
    # The member closes the console: the next tick suspends that VM too, once.
    ConsoleSession.objects.filter(pk=console.pk).update(ended_at=berlin(2026, 3, 31, 11, 40))
    (later,) = tick_at(berlin(2026, 3, 31, 11, 41))
    assert (later.vm, later.kind) == (watched, OperationKind.SUSPEND)
    assert tick_at(berlin(2026, 3, 31, 11, 42)) == []


def test_after_class_the_clock_gives_up_past_its_deadline(
    berlin_course, group_a, make_vm, alice, sent
):
    weekly(berlin_course)
    vm = make_vm(group_a)
    ConsoleSession.objects.create(vm=vm, user=alice)
    assert tick_at(berlin(2026, 3, 31, 11, 30)) == []
    ConsoleSession.objects.update(ended_at=berlin(2026, 3, 31, 14, 0))
    assert tick_at(berlin(2026, 3, 31, 13, 31)) == []  # two hours after class: idle's job


def test_a_course_that_stops_vms_after_class_asks_for_a_shut_down(
    berlin_course, group_a, make_vm, sent
):
    Course.objects.filter(pk=berlin_course.pk).update(clock_after=ClockAfter.STOP)
    weekly(berlin_course)
    make_vm(group_a)
    (op,) = tick_at(berlin(2026, 3, 31, 11, 31))
    assert op.kind == OperationKind.STOP


def test_a_course_that_leaves_vms_running_is_not_touched_after_class(
    berlin_course, group_a, make_vm, sent
):
    Course.objects.filter(pk=berlin_course.pk).update(clock_after=ClockAfter.LEAVE)
    weekly(berlin_course)
    make_vm(group_a)
    assert tick_at(berlin(2026, 3, 31, 11, 31)) == []


def test_vms_are_not_suspended_between_two_classes_closer_than_the_lead_time(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course, (10, 0), (11, 0))
    weekly(berlin_course, (11, 5), (12, 0))
    make_vm(group_a)
    assert tick_at(berlin(2026, 3, 31, 11, 0)) == []
    assert tick_at(berlin(2026, 3, 31, 11, 2)) == []
    (op,) = tick_at(berlin(2026, 3, 31, 12, 0))
    assert op.kind == OperationKind.SUSPEND


def test_the_clock_acts_at_ten_local_on_the_first_tuesday_of_summer_time(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course)
    make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    # 08:49 UTC is 09:49 in winter time but 10:49 now: the class began at 08:00 UTC.
    assert tick_at(datetime(2026, 3, 31, 7, 49, tzinfo=UTC)) == []
    (op,) = tick_at(datetime(2026, 3, 31, 7, 50, tzinfo=UTC))
    assert op.kind == OperationKind.START


def test_a_holiday_has_no_clock_actions(berlin_course, group_a, make_vm, sent):
    weekly(berlin_course)
    ClassHoliday.objects.create(
        course=berlin_course, first_day=date(2026, 3, 31), last_day=date(2026, 3, 31)
    )
    make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    assert tick_at(berlin(2026, 3, 31, 9, 55)) == []


# --- what people see ---------------------------------------------------------------------------


def test_the_group_page_shows_the_next_class_in_the_course_zone_and_the_clock_as_requester(
    berlin_course, group_a, make_vm, alice, client_for, sent
):
    weekly(berlin_course)
    make_vm(group_a)
    url = reverse("labs:group_detail", args=[group_a.pk])
    with time_machine.travel(berlin(2026, 3, 30, 12, 0), tick=False):
        page = client_for(alice).get(url).content.decode()
    assert "Next class:" in page
    assert "Tue 31 Mar 10:00–11:30" in page
    assert "(Europe/Berlin time)" in page
    assert "VMs start at 09:50; after class they are suspended" in page

    tick_at(berlin(2026, 3, 31, 11, 30))
    with time_machine.travel(berlin(2026, 3, 31, 11, 20), tick=False):
        soon = client_for(alice).get(url).content.decode()
    assert "Class now:" in soon
    assert "VMs suspend in 10 min" in soon
    assert "Course clock" in soon


def test_a_course_without_a_schedule_says_nothing_about_classes(
    group_a, make_vm, alice, client_for
):
    make_vm(group_a)
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk]))
    assert "Next class" not in page.content.decode()


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weekday": TUESDAY, "starts_at": time(11), "ends_at": time(10)}, "ends (10:00) before"),
        ({"starts_at": time(10), "ends_at": time(11)}, "weekly class needs a weekday"),
        (
            {"weekday": 1, "date": date(2026, 4, 1), "starts_at": time(10), "ends_at": time(11)},
            "not both",
        ),
    ],
)
def test_a_class_that_makes_no_sense_is_refused_with_its_reason(course, fields, message):
    with pytest.raises(ValidationError) as refused:
        ClassSession(course=course, **fields).full_clean()
    assert message in str(refused.value)


def test_a_course_with_an_unknown_time_zone_is_refused_naming_it(course):
    course.time_zone = "Europe/Atlantis"
    with pytest.raises(ValidationError) as refused:
        course.full_clean()
    assert "“Europe/Atlantis” is not a time zone name" in str(refused.value)


def test_a_holiday_ending_before_it_starts_is_refused(course):
    with pytest.raises(ValidationError, match="last day comes on or after"):
        ClassHoliday(
            course=course, first_day=date(2026, 4, 2), last_day=date(2026, 4, 1)
        ).full_clean()


def test_two_ticks_deciding_the_same_vm_at_once_ask_for_one_operation(
    berlin_course, group_a, make_vm, sent
):
    weekly(berlin_course)
    make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    moment = berlin(2026, 3, 31, 9, 52)
    # Both ticks looked before either wrote: the unique ClockAction decides.
    first = clock.due_actions(fresh(berlin_course), moment)[0]
    second = clock.due_actions(fresh(berlin_course), moment)[0]
    assert clock.action_take(due=first) is not None
    assert clock.action_take(due=second) is None
    assert Operation.objects.count() == 1


def test_the_course_overview_names_the_course_clock_as_requester(
    berlin_course, group_a, make_vm, ines, client_for, sent
):
    weekly(berlin_course)
    make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    tick_at(berlin(2026, 3, 31, 9, 50))
    page = client_for(ines).get(reverse("labs:course_overview", args=[berlin_course.slug]))
    assert "Course clock" in page.content.decode()
