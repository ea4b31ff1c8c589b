"""The class schedule in the course admin: the course's instructors edit it (and the
clock's settings, nothing else of the course), its TAs read it, with messages that name
what is wrong."""

from datetime import time

import pytest
from django.urls import reverse
from django.utils import timezone

from labs.models import ClassSession

pytestmark = pytest.mark.django_db


def course_form(course, *, sessions=(), **fields) -> dict:
    data = {
        "time_zone": "Europe/Berlin",
        "clock_lead_minutes": "15",
        "clock_after": "stop",
        "idle_minutes": "60",
        "idle_warn_minutes": "10",
        "idle_action": "save",
        "idle_cpu_percent": "5",
        "hours_exclude_class": "on",
        "term_warning_days": "7",
        "published_ports_per_group": "3",
        "forbidden_guest_ports": "22,25",
        "class_sessions-TOTAL_FORMS": str(len(sessions)),
        "class_sessions-INITIAL_FORMS": "0",
        "class_holidays-TOTAL_FORMS": "1",
        "class_holidays-INITIAL_FORMS": "0",
        "class_holidays-0-first_day": "2026-04-06",
        "class_holidays-0-last_day": "2026-04-06",
        "class_holidays-0-label": "Easter Monday",
        **fields,
    }
    for i, row in enumerate(sessions):
        data.update({f"class_sessions-{i}-{k}": v for k, v in row.items()})
    return data


def change_url(course) -> str:
    return reverse("admin:labs_course_change", args=[course.pk])


def test_an_instructor_sets_the_schedule_and_the_clock_but_not_the_courses_title(
    client_for, ines, course
):
    response = client_for(ines).post(
        change_url(course),
        course_form(
            course,
            sessions=[{"weekday": "1", "starts_at": "10:00", "ends_at": "11:30"}],
            title="Renamed",
        ),
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    course.refresh_from_db()
    assert (course.time_zone, course.clock_lead_minutes, course.clock_after) == (
        "Europe/Berlin",
        15,
        "stop",
    )
    assert course.title == "Operating Systems"
    (session,) = ClassSession.objects.filter(course=course)
    assert (session.weekday, session.starts_at, session.ends_at) == (1, time(10), time(11, 30))
    assert course.class_holidays.get().label == "Easter Monday"


def test_an_instructor_sets_the_idle_rule_hours_deadline_and_end_of_term(client_for, ines, course):
    response = client_for(ines).post(
        change_url(course),
        course_form(
            course,
            idle_minutes="45",
            idle_warn_minutes="15",
            idle_action="stop",
            hours_quota="40",
            deadline_at_0="2027-01-15",
            deadline_at_1="17:00:00",
            term_ends_at_0="2027-02-28",
            term_ends_at_1="23:00:00",
            term_warning_days="10",
        ),
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    course.refresh_from_db()
    assert (course.idle_minutes, course.idle_warn_minutes, course.idle_action) == (45, 15, "stop")
    assert (course.hours_quota, course.term_warning_days) == (40, 10)
    # Local times of the site's zone, stored as moments.
    assert course.deadline_at < course.term_ends_at
    assert timezone.localtime(course.deadline_at).strftime("%Y-%m-%d %H:%M") == (
        "2027-01-15 17:00"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"idle_minutes": "30", "idle_warn_minutes": "30"}, "The warning comes before the action"),
        (
            {
                "deadline_at_0": "2027-03-01",
                "deadline_at_1": "17:00:00",
                "term_ends_at_0": "2027-02-28",
                "term_ends_at_1": "23:00:00",
            },
            "The term ends after the deadline",
        ),
    ],
)
def test_clock_settings_that_contradict_each_other_are_refused(
    client_for, ines, course, fields, message
):
    response = client_for(ines).post(change_url(course), course_form(course, **fields))
    assert response.status_code == 200
    assert message in response.content.decode()
    course.refresh_from_db()
    assert course.deadline_at is None and course.idle_minutes == 60


@pytest.mark.parametrize(
    ("row", "fields", "message"),
    [
        ({"weekday": "1", "starts_at": "11:00", "ends_at": "10:00"}, {}, "ends (10:00) before"),
        ({"starts_at": "10:00", "ends_at": "11:00"}, {}, "A weekly class needs a weekday"),
        (
            {"weekday": "1", "starts_at": "10:00", "ends_at": "11:00"},
            {"time_zone": "Mars/Olympus"},
            "“Mars/Olympus” is not a time zone name",
        ),
    ],
)
def test_a_schedule_that_makes_no_sense_is_refused_naming_the_problem(
    client_for, ines, course, row, fields, message
):
    response = client_for(ines).post(
        change_url(course), course_form(course, sessions=[row], **fields)
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ClassSession.objects.exists()


def test_a_ta_reads_the_schedule_and_changes_nothing(client_for, tara, course):
    ClassSession.objects.create(course=course, weekday=1, starts_at=time(10), ends_at=time(11))
    client = client_for(tara)
    page = client.get(change_url(course))
    assert page.status_code == 200
    assert "Tuesday" in page.content.decode()
    assert client.post(change_url(course), course_form(course)).status_code == 403
    course.refresh_from_db()
    assert (course.clock_lead_minutes, course.class_holidays.count()) == (10, 0)


def test_another_courses_instructor_cannot_open_the_schedule(client_for, olga, course):
    assert client_for(olga).get(change_url(course)).status_code in (302, 404)
