"""The pushed regions (labs/live/regions.py): one rendering per audience, nothing of one
viewer in it, each audience its own controls, each group its own channel, a burst
rendered once.

The renderings are compared with what each viewer's own page holds (the test client) and
read off the wire (a ``Listener`` on the real Redis layer, tests/live/test_events.py).
"""

import queue
import re
import time

import pytest
from django.db import transaction

from labs.choices import ObservedState
from labs.live import events, regions
from labs.models import Course, Vm
from tests.live.test_events import course_of, group_of

TOKEN_INPUT = re.compile(r'<input type="hidden" name="csrfmiddlewaretoken" value="[^"]*">')
META_TOKEN = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def within(listener, seconds: float) -> list[dict]:
    """Every message, pushes included, that arrives within ``seconds``."""
    got = []
    try:
        while True:
            got.append(listener.received.get(timeout=seconds))
    except queue.Empty:
        return got


def page_of(client_for, user, group) -> str:
    return client_for(user).get(f"/groups/{group.pk}/").content.decode()


def token_of(page: str) -> str:
    return META_TOKEN.search(page).group(1)


def tokens_in(page: str) -> set[str]:
    return set(re.findall(r'name="csrfmiddlewaretoken" value="([^"]+)"', page))


@pytest.fixture
def approved_a(group_a, make_vm):
    make_vm(group_a, name="vm1", ssh_port=22000)
    Course.objects.filter(pk=group_a.course_id).update(hours_per_student=True)
    group_a.refresh_from_db()
    return group_a


@pytest.mark.django_db
def test_the_members_rendering_holds_neither_members_token_nor_hours_and_is_what_both_pages_show(
    approved_a, alice, bob, client_for
):
    alices, bobs = page_of(client_for, alice, approved_a), page_of(client_for, bob, approved_a)
    assert token_of(alices) != token_of(bobs)
    assert "you: 0.0 h" in alices and "you: 0.0 h" in bobs  # each page has its viewer's own

    shared = regions.group_regions(group=approved_a, staff=False)

    assert set(shared) == set(regions.GROUP_REGIONS)
    for key, html in shared.items():
        assert "csrfmiddlewaretoken" not in html, key
        assert token_of(alices) not in html and token_of(bobs) not in html, key
        assert not tokens_in(alices) & set(re.findall(r"[A-Za-z0-9]{64}", html)), key
        assert "you:" not in html and 'class="who"' not in html, key
        # The same HTML each member's page shows, but for their own token.
        assert html in TOKEN_INPUT.sub("", alices), key
        assert html in TOKEN_INPUT.sub("", bobs), key
    assert 'data-live-region="hours"' not in "".join(shared.values())


@pytest.mark.django_db
def test_the_staff_rendering_is_what_the_instructor_sees_with_observe_and_without_the_forms(
    approved_a, ines, client_for
):
    instructors = TOKEN_INPUT.sub("", page_of(client_for, ines, approved_a))
    staff = regions.group_regions(group=approved_a, staff=True)
    members = regions.group_regions(group=approved_a, staff=False)

    assert "?mode=view" in staff["machines"] and "?mode=view" not in members["machines"]
    assert "Replace key" in members["edit"] and "Replace key" not in staff["edit"]
    for key, html in staff.items():
        assert html in instructors, key
    assert 'data-live-audience="staff"' in instructors


@pytest.mark.django_db
def test_a_change_of_group_a_is_pushed_to_a_alone_rendered_once_per_audience(
    approved_a, group_b, make_vm, listen, django_capture_on_commit_callbacks
):
    make_vm(group_b, name="vm1", ssh_port=22001)
    vm = Vm.objects.get(group=approved_a)
    a_members, staff, staff_page, b_members = (
        listen(group_of(approved_a)),
        listen(course_of(approved_a)),
        listen(events.staff_page_channel(approved_a.pk)),
        listen(group_of(group_b)),
    )
    before = regions.RENDERS.copy()
    with django_capture_on_commit_callbacks(execute=True):
        Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
        events.vm_changed(vm=vm)

    pushed = [m["payload"] for m in within(a_members, 1)]
    pushes = [p for p in pushed if p["type"] == "regions"]
    assert [(p["page"], p["group"], p["audience"]) for p in pushes] == [
        ("group", approved_a.pk, "members")
    ]
    assert "Stopped" in pushes[0]["regions"]["machines"]
    assert "Bravo" not in "".join(pushes[0]["regions"].values())
    to_staff = [m["payload"] for m in within(staff, 1) if m["payload"]["type"] == "regions"]
    assert [(p["page"], p["audience"]) for p in to_staff] == [("course", "staff")]
    to_page = [m["payload"] for m in within(staff_page, 1)]
    assert [(p["page"], p["group"], p["audience"]) for p in to_page] == [
        ("group", approved_a.pk, "staff")
    ]
    assert within(b_members, 0.5) == []
    assert regions.RENDERS - before == {"group:members": 1, "group:staff": 1, "course:staff": 1}


@pytest.mark.django_db
def test_nothing_is_rendered_for_channels_nobody_listens_on(
    approved_a, django_capture_on_commit_callbacks
):
    before = regions.RENDERS.copy()
    with django_capture_on_commit_callbacks(execute=True):
        events.vm_changed(vm=Vm.objects.get(group=approved_a))
    assert before == regions.RENDERS


@pytest.mark.django_db
def test_only_the_overview_is_rendered_when_only_an_overview_listens(
    approved_a, listen, django_capture_on_commit_callbacks
):
    listen(course_of(approved_a))
    before = regions.RENDERS.copy()
    with django_capture_on_commit_callbacks(execute=True):
        events.vm_changed(vm=Vm.objects.get(group=approved_a))
    assert regions.RENDERS - before == {"course:staff": 1}


@pytest.mark.django_db
def test_the_staff_rendering_of_a_group_page_is_made_when_a_staff_member_has_it_open(
    approved_a, listen, django_capture_on_commit_callbacks
):
    listen(events.staff_page_channel(approved_a.pk))
    before = regions.RENDERS.copy()
    with django_capture_on_commit_callbacks(execute=True):
        events.vm_changed(vm=Vm.objects.get(group=approved_a))
    assert regions.RENDERS - before == {"group:staff": 1}


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_changes_within_the_window_is_rendered_once(approved_a, listen, settings):
    settings.LIVE_COALESCE_MS = 2000  # the whole burst (ten commits, each published) fits
    members = listen(group_of(approved_a))
    vm = Vm.objects.get(group=approved_a)
    before = regions.RENDERS.copy()
    for state in [ObservedState.SHUTOFF, ObservedState.RUNNING] * 5:
        with transaction.atomic():
            Vm.objects.filter(pk=vm.pk).update(observed_state=state)
            events.vm_changed(vm=vm)
    deadline = time.monotonic() + 10
    pushes = []
    while time.monotonic() < deadline and not pushes:
        pushes = [m["payload"] for m in within(members, 0.5) if m["payload"]["type"] == "regions"]
    assert len(pushes) == 1
    assert "Running" in pushes[0]["regions"]["machines"]  # the last state
    assert regions.RENDERS - before == {"group:members": 1}  # nobody on the course channel
