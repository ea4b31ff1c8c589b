"""The instructor's overview in a real browser: pick two groups, shut their VMs down."""

import pytest

from labs.choices import ObservedState
from labs.compute import dispatch
from labs.models import Operation

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def sent(monkeypatch):
    """Operations the site hands to Celery: recorded here, never sent to a real broker
    (the live server runs in this process)."""
    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "")
    return ids


@pytest.fixture
def three_groups(course, group_a, group_b, dave, make_group, make_vm):
    group_c = make_group(course=course, by=dave, name="Charlie")
    make_vm(group_a, name="vm1")
    make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF)
    make_vm(group_b, name="vm1")
    make_vm(group_c, name="vm1")
    return group_a, group_b, group_c


def sign_in(page, live_server, username, password):
    page.goto(live_server.url + "/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_the_instructor_shuts_down_two_groups_from_the_overview(
    live_server, page, ines, password, three_groups, sent, artifacts
):
    ines.set_password(password)
    ines.save()
    sign_in(page, live_server, "ines", password)

    page.get_by_role("link", name="Course overview").click()
    page.get_by_role("heading", level=1, name="Operating Systems").wait_for()
    groups = page.locator('[data-live-region="groups"]')
    assert groups.get_by_role("link", name="Charlie", exact=True).is_visible()

    page.get_by_label("Alpha").check()  # a click …
    page.get_by_label("Bravo").focus()  # … and the keyboard
    page.keyboard.press("Space")
    page.get_by_label("Shut down").check()
    assert not page.get_by_label("I understand").is_visible()  # only asked for a reset
    page.get_by_role("button", name="Queue the operations").click()

    page.get_by_text("Queued 2 operations; skipped 1: Alpha/vm2 is stopped.").wait_for()
    rows = page.locator('[data-live-region="operations"] tbody tr')
    texts = sorted(rows.all_inner_texts())
    assert len(texts) == 2
    assert "Alpha / vm1" in texts[0] and "Shut down" in texts[0] and "Queued" in texts[0]
    assert "Bravo / vm1" in texts[1] and "Shut down" in texts[1] and "Queued" in texts[1]
    assert sorted(Operation.objects.values_list("vm__group__name", "vm__name", "kind")) == [
        ("Alpha", "vm1", "stop"),
        ("Bravo", "vm1", "stop"),
    ]
    assert sorted(sent) == sorted(Operation.objects.values_list("pk", flat=True))
    page.screenshot(path=str(artifacts / "overview-bulk.png"), full_page=True)


def test_the_overview_fits_a_narrow_window(
    live_server, page, ines, password, three_groups, artifacts
):
    ines.set_password(password)
    ines.save()
    page.set_viewport_size({"width": 360, "height": 800})
    sign_in(page, live_server, "ines", password)
    page.get_by_role("link", name="Course overview").click()
    page.get_by_role("heading", level=1).wait_for()

    # The page itself does not scroll sideways; the wide tables scroll inside their box.
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    wrap = page.locator('[data-live-region="groups"]')
    assert wrap.evaluate("el => el.scrollWidth > el.clientWidth")
    assert page.get_by_role("button", name="Queue the operations").is_visible()
    page.screenshot(path=str(artifacts / "overview-narrow.png"), full_page=True)
