"""Smoke test in a real browser: sign in, sign up a group, see it pending."""

import pytest
from django.contrib.auth import get_user_model

from labs.models import Group, Membership

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_student_signs_in_signs_up_a_group_and_sees_it_pending(
    live_server, page, course, make_public_key, make_student, password, artifacts
):
    make_student("bob")
    erin = get_user_model().objects.create_user(
        "erin", "erin@example.edu", password, first_name="Erin"
    )
    Membership.objects.create(course=course, user=erin)

    page.goto(live_server.url + "/")
    assert "/accounts/login/" in page.url
    page.get_by_label("Username").fill("erin")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()

    page.get_by_role("link", name="Sign up a group").click()
    page.get_by_label("Group name").fill("Kernel <Hackers> & co")
    page.get_by_label("Other members").fill("bob")
    page.get_by_label("Project title").fill("A tiny kernel")
    page.get_by_label("Project idea").fill("Boot, schedule, and print 'hello'.")
    page.get_by_label("SSH public key").fill(make_public_key("erin@laptop"))
    page.get_by_role("button", name="Sign up").click()

    page.get_by_text("waits for review").wait_for()
    heading = page.get_by_role("heading", level=1)
    assert heading.inner_text().startswith("Kernel <Hackers> & co")
    assert "Pending review" in heading.inner_text()
    assert page.get_by_text("Waiting for an instructor to review this group.").is_visible()
    members = page.locator("ul.members").inner_text()
    assert "erin" in members and "bob" in members
    group = Group.objects.get()
    assert page.get_by_text(group.ssh_key_fingerprint).is_visible()
    page.screenshot(path=str(artifacts / "signup-pending.png"), full_page=True)

    # A teammate's home page now shows the group, pending.
    page.get_by_role("button", name="Sign out").click()
    assert "/accounts/" in page.url
