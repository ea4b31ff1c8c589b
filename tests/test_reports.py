"""Usage hours on the pages: the group page's hours line, the overview's Usage section and
chart, the staff-only CSV, and the admin fields (labs/compute/usage.py, labs/reports.py).

The cast: alice and bob (Alpha), carol (Bravo), ines (instructor), tara (TA), otto and
olga (staff of another course only), anonymous.
"""

import csv
import io
import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.models import Course, Group, Operation, Snapshot, StateChange

pytestmark = pytest.mark.django_db

S = ObservedState


def ran(vm, hours: float, by=None, days_ago: int = 1) -> None:
    """``vm`` ran ``hours`` hours (started by ``by``), ending ``days_ago`` days ago."""
    end = timezone.now() - timedelta(days=days_ago)
    start = end - timedelta(hours=hours)
    StateChange.objects.create(vm=vm, state=S.RUNNING, at=start, started_by=by)
    StateChange.objects.create(vm=vm, state=S.SHUTOFF, at=end)


def set_course(course, **fields) -> None:
    Course.objects.filter(pk=course.pk).update(
        created_at=timezone.now() - timedelta(days=10), **fields
    )


def csv_url(course) -> str:
    return reverse("labs:course_usage_csv", args=[course.slug])


# --- the group page ----------------------------------------------------------------------------


def test_the_group_page_says_the_hours_used_of_the_allowance_and_the_viewers_own(
    client_for, course, group_a, make_vm, alice, bob
):
    set_course(course, hours_quota=40, hours_per_student=True)
    vm = make_vm(group_a)
    ran(vm, 9.5, by=bob, days_ago=2)
    ran(vm, 3, by=alice)
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    assert "Hours: 12.5 of 40 h this term" in page
    assert "you: 3.0 h" in page
    assert "hours-ok" in page and "for more hours" not in page


def test_the_group_page_warns_at_80_percent_and_says_so_at_100(
    client_for, course, group_a, make_vm, alice
):
    set_course(course, hours_quota=10)
    vm = make_vm(group_a)
    ran(vm, 8.5)
    url = reverse("labs:group_detail", args=[group_a.pk])
    page = client_for(alice).get(url).content.decode()
    assert "Hours: 8.5 of 10 h this term" in page and "hours-warn" in page
    assert "you:" not in page  # not counted each
    ran(vm, 2, days_ago=2)
    page = client_for(alice).get(url).content.decode()
    assert "hours-over" in page
    assert (
        "Your group has used its 10 h for this term; ask your instructor for more hours." in page
    )


def test_without_an_hours_limit_the_page_says_only_the_hours(
    client_for, course, group_a, make_vm, alice
):
    set_course(course)
    ran(make_vm(group_a), 2)
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    assert "Hours: 2.0 h this term" in page


def test_a_student_refused_a_start_over_the_hours_reads_why_on_the_page(
    client_for, course, group_a, make_vm, alice, monkeypatch
):
    from labs.compute import dispatch

    monkeypatch.setattr(dispatch, "task_send", lambda op_id: "t-1")
    set_course(course, hours_quota=1)
    vm = make_vm(group_a, observed_state=S.SHUTOFF)
    ran(vm, 2)
    client = client_for(alice)
    response = client.post(reverse("labs:vm_operation", args=[vm.pk, "start"]), follow=True)
    assert "Your group has used its 1 h for this term" in response.content.decode()
    assert not Operation.objects.filter(vm=vm, kind=OperationKind.START).exists()


# --- the overview and the CSV ----------------------------------------------------------------


@pytest.fixture
def used(course, group_a, group_b, make_vm, alice, bob, carol, ines):
    """Alpha ran 12 h (alice 5, bob 4, ines 3) on two VMs with a snapshot and two idle
    suspensions; Bravo ran 1.5 h (carol)."""
    set_course(course, hours_quota=40, hours_per_student=True)
    a1, a2 = make_vm(group_a, name="vm1"), make_vm(group_a, name="vm2")
    ran(a1, 5, by=alice)
    ran(a2, 4, by=bob)
    ran(a2, 3, by=ines, days_ago=3)
    Snapshot.objects.create(vm=a1, name="before-exam", with_memory=False)
    for _ in range(2):
        Operation.objects.create(
            vm=a1,
            kind=OperationKind.SAVE,
            status=OperationStatus.SUCCEEDED,
            params={"clock": "idle"},
        )
    Operation.objects.create(
        vm=a2, kind=OperationKind.SAVE, status=OperationStatus.SUCCEEDED, params={"clock": "hours"}
    )
    ran(make_vm(group_b), 1.5, by=carol)
    return course


def test_the_csv_has_a_row_per_group_and_per_student(client_for, ines, used):
    response = client_for(ines).get(csv_url(used))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="os101-usage.csv"' in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows == [
        ["course", "group", "student", "hours", "vms", "snapshots", "idle_suspensions"],
        ["os101", "Alpha", "", "12.00", "2", "1", "2"],
        ["os101", "Alpha", "alice", "5.00", "", "", ""],
        ["os101", "Alpha", "bob", "4.00", "", "", ""],
        ["os101", "Bravo", "", "1.50", "1", "0", "0"],
        ["os101", "Bravo", "carol", "1.50", "", "", ""],
    ]


def test_a_group_name_cannot_become_a_spreadsheet_formula(client_for, ines, used, group_a):
    Group.objects.filter(pk=group_a.pk).update(name="=HYPERLINK(1)")
    rows = list(csv.reader(io.StringIO(client_for(ines).get(csv_url(used)).content.decode())))
    assert rows[1][1] == "'=HYPERLINK(1)"


@pytest.mark.parametrize("who", ["alice", "carol", "otto", "olga"])
def test_the_csv_is_for_the_courses_staff_only(client_for, used, who, request):
    user = request.getfixturevalue(who)
    assert client_for(user).get(csv_url(used)).status_code == 404


def test_the_csv_asks_an_anonymous_visitor_to_sign_in(client, used):
    response = client.get(csv_url(used))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_ta_downloads_the_csv_too(client_for, tara, used):
    assert client_for(tara).get(csv_url(used)).status_code == 200


def test_the_overview_shows_the_usage_table_and_a_chart_of_hours_per_day(client_for, ines, used):
    page = client_for(ines).get(reverse("labs:course_overview", args=[used.slug])).content.decode()
    section = page[page.index('id="usage-heading"') :]
    section = section[: section.index("</section>")]
    assert "13.5 h in all" in section
    assert csv_url(used) in section
    table = re.sub(r"\s+", " ", section[section.index("<table") :])
    assert "Alpha</th>" in table and '12.0 <span class="muted">of 40</span>' in table
    assert "alice</th>" in table  # counted each: a row per student
    svg = section[section.index("<svg") : section.index("</svg>")]
    assert 'role="img"' in svg and '<title id="usage-chart-title">Running hours per day' in svg
    bars = re.findall(r"<rect [^>]*><title>([^<]+)</title></rect>", svg)
    assert len(bars) == 11  # 10 days ago to today, a bar a day
    hours = [float(title.rsplit(": ", 1)[1].removesuffix(" h")) for title in bars]
    assert sum(hours) == pytest.approx(13.5, abs=0.15)  # each bar says its day's hours
    assert hours[-1] == 0.0  # nothing ran today
    assert "style=" not in svg and "<script" not in svg  # the CSP


def test_the_overview_lists_no_student_rows_when_students_are_not_counted_each(
    client_for, ines, used
):
    Course.objects.filter(pk=used.pk).update(hours_per_student=False)
    page = client_for(ines).get(reverse("labs:course_overview", args=[used.slug])).content.decode()
    section = page[page.index('id="usage-heading"') : page.index('id="hosts-heading"')]
    assert "Alpha</th>" in section and "alice</th>" not in section


# --- the admin -----------------------------------------------------------------------------------


def _extra_hours_post(client, group, value: str):
    return client.post(
        reverse("admin:labs_group_change", args=[group.pk]),
        {
            "quota_vms": "",
            "quota_vcpus": "",
            "quota_memory_mib": "",
            "quota_disk_gib": "",
            "extra_hours": value,
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )


def test_an_instructor_grants_a_group_extra_hours(client_for, ines, group_a):
    response = _extra_hours_post(client_for(ines), group_a, "12")
    assert response.status_code == 302, response.content.decode()[:2000]
    group_a.refresh_from_db()
    assert group_a.extra_hours == 12


def test_a_ta_cannot_grant_extra_hours(client_for, tara, group_a):
    _extra_hours_post(client_for(tara), group_a, "12")
    group_a.refresh_from_db()
    assert group_a.extra_hours == 0


@pytest.mark.parametrize("who", ["olga", "otto"])
def test_another_courses_staff_cannot_grant_extra_hours(client_for, group_a, who, request):
    response = _extra_hours_post(client_for(request.getfixturevalue(who)), group_a, "12")
    assert response.status_code in (302, 403, 404)
    group_a.refresh_from_db()
    assert group_a.extra_hours == 0


def test_the_course_admin_shows_the_hours_in_their_own_fieldset(client_for, ines, course):
    page = client_for(ines).get(reverse("admin:labs_course_change", args=[course.pk]))
    text = page.content.decode()
    assert page.status_code == 200
    hours = text[text.index("Usage hours") :]
    for name in ("hours_quota", "hours_per_student", "hours_exclude_class"):
        assert f'name="{name}"' in hours  # editable by the course's instructor
