"""Every student-facing page for the cast: anonymous, member, teammate, other group, instructor."""

import pytest
from django.urls import reverse

from labs.choices import GroupStatus
from labs.models import Group, Host
from labs.people.groups import group_approve, group_reject

pytestmark = pytest.mark.django_db


def detail(group):
    return reverse("labs:group_detail", args=[group.pk])


def signup_data(key, **over):
    data = {
        "name": "Gamma",
        "members": "",
        "project_title": "Scheduler",
        "project_idea": "A lottery scheduler.",
        "ssh_public_key": key,
    }
    data.update(over)
    return data


# --- anonymous ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["home", "detail", "edit", "signup"])
def test_anonymous_visitors_are_sent_to_sign_in(client, group_a, name):
    url = {
        "home": reverse("labs:home"),
        "detail": detail(group_a),
        "edit": reverse("labs:group_edit", args=[group_a.pk]),
        "signup": reverse("labs:group_signup", args=["os101"]),
    }[name]
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_anonymous_key_replacement_changes_nothing(client, group_a, make_public_key):
    before = group_a.ssh_key_fingerprint
    response = client.post(
        reverse("labs:group_key", args=[group_a.pk]), {"ssh_public_key": make_public_key()}
    )
    assert response.status_code == 302
    group_a.refresh_from_db()
    assert group_a.ssh_key_fingerprint == before


# --- home --------------------------------------------------------------------------------


def test_home_shows_a_student_without_group_the_signup_link(client_for, dave, course):
    page = client_for(dave).get(reverse("labs:home")).content.decode()
    assert "Operating Systems" in page
    assert reverse("labs:group_signup", args=["os101"]) in page


def test_home_shows_a_member_their_group_and_status(client_for, alice, group_a):
    page = client_for(alice).get(reverse("labs:home")).content.decode()
    assert detail(group_a) in page and "Pending review" in page


def test_home_shows_the_instructor_where_reviews_happen(client_for, ines, course):
    page = client_for(ines).get(reverse("labs:home")).content.decode()
    assert reverse("admin:labs_group_changelist") in page


# --- group page ----------------------------------------------------------------------------


def test_the_member_sees_members_idea_fingerprint_and_status(client_for, alice, group_a):
    page = client_for(alice).get(detail(group_a)).content.decode()
    for text in ["Alpha", "alice", "bob", "We write a POSIX shell.", "Pending review"]:
        assert text in page
    assert group_a.ssh_key_fingerprint in page


def test_a_teammate_sees_the_same_page_and_can_edit(client_for, bob, group_a):
    page = client_for(bob).get(detail(group_a)).content.decode()
    assert "We write a POSIX shell." in page
    assert reverse("labs:group_edit", args=[group_a.pk]) in page


def test_a_student_of_another_group_gets_a_404_with_nothing_of_the_group(
    client_for, carol, group_a, group_b
):
    client = client_for(carol)
    response = client.get(detail(group_a))
    assert response.status_code == 404
    assert b"POSIX" not in response.content and b"Alpha" not in response.content
    assert client.get(reverse("labs:group_edit", args=[group_a.pk])).status_code == 404


def test_a_student_without_group_gets_a_404_for_any_group(client_for, dave, group_a):
    assert client_for(dave).get(detail(group_a)).status_code == 404


def test_a_missing_group_is_a_404_like_a_forbidden_one(client_for, alice, group_a):
    assert client_for(alice).get(reverse("labs:group_detail", args=[99999])).status_code == 404


def test_the_instructor_sees_any_group_of_the_course_without_edit_forms(client_for, ines, group_a):
    page = client_for(ines).get(detail(group_a)).content.decode()
    assert "We write a POSIX shell." in page
    assert reverse("labs:group_key", args=[group_a.pk]) not in page


def test_an_instructor_of_another_course_gets_a_404(client_for, make_student, group_a):
    from labs.models import Course

    other = Course.objects.create(slug="net", title="Networks")
    tom = make_student("tom", role="instructor", in_course=other)
    assert client_for(tom).get(detail(group_a)).status_code == 404


def test_the_reviewer_note_is_shown_to_members(client_for, alice, ines, group_a):
    group_reject(group=group_a, by=ines, note="Say what you will measure.")
    page = client_for(alice).get(detail(group_a)).content.decode()
    assert "Say what you will measure." in page and "Rejected" in page
    assert "resubmit" in page


# --- signup ------------------------------------------------------------------------------


def test_a_student_signs_up_a_group_and_lands_on_its_page(client_for, dave, make_public_key):
    client = client_for(dave)
    assert b"Sign up" in client.get(reverse("labs:group_signup", args=["os101"])).content
    response = client.post(
        reverse("labs:group_signup", args=["os101"]), signup_data(make_public_key()), follow=True
    )
    group = Group.objects.get(name="Gamma")
    assert response.redirect_chain[-1][0] == detail(group)
    assert b"waits for review" in response.content


def test_signup_errors_are_shown_next_to_the_fields(client_for, dave, make_public_key):
    response = client_for(dave).post(
        reverse("labs:group_signup", args=["os101"]),
        signup_data("-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n", members="nobody"),
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "private key" in page
    assert not Group.objects.exists()


def test_signup_without_csrf_token_is_refused(dave, make_public_key):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(dave)
    response = client.post(
        reverse("labs:group_signup", args=["os101"]), signup_data(make_public_key())
    )
    assert response.status_code == 403
    assert not Group.objects.exists()


def test_a_member_visiting_signup_is_sent_to_their_group(client_for, alice, group_a):
    response = client_for(alice).get(reverse("labs:group_signup", args=["os101"]))
    assert response.status_code == 302 and response["Location"] == detail(group_a)


def test_signup_for_a_course_not_on_your_roster_is_a_404(client_for, dave, make_public_key):
    from labs.models import Course

    Course.objects.create(slug="secret", title="Secret course")
    client = client_for(dave)
    assert client.get(reverse("labs:group_signup", args=["secret"])).status_code == 404
    response = client.post(
        reverse("labs:group_signup", args=["secret"]), signup_data(make_public_key())
    )
    assert response.status_code == 404
    assert not Group.objects.exists()


def test_the_instructor_gets_no_signup_form(client_for, ines, make_public_key):
    client = client_for(ines)
    page = client.get(reverse("labs:group_signup", args=["os101"])).content.decode()
    assert "Only students sign up groups" in page
    client.post(reverse("labs:group_signup", args=["os101"]), signup_data(make_public_key()))
    assert not Group.objects.exists()


# --- edit and key ------------------------------------------------------------------------


def test_a_teammate_edits_the_idea(client_for, bob, group_a):
    response = client_for(bob).post(
        reverse("labs:group_edit", args=[group_a.pk]),
        {"project_title": "Shell 2", "project_idea": "Pipes and job control."},
        follow=True,
    )
    assert b"Pipes and job control." in response.content
    group_a.refresh_from_db()
    assert group_a.project_title == "Shell 2"


def test_another_group_cannot_edit_or_replace_the_key(
    client_for, carol, group_a, group_b, make_public_key
):
    client = client_for(carol)
    before = (group_a.project_idea, group_a.ssh_key_fingerprint)
    assert (
        client.post(
            reverse("labs:group_edit", args=[group_a.pk]),
            {"project_title": "x", "project_idea": "hijacked"},
        ).status_code
        == 404
    )
    assert (
        client.post(
            reverse("labs:group_key", args=[group_a.pk]), {"ssh_public_key": make_public_key()}
        ).status_code
        == 404
    )
    group_a.refresh_from_db()
    assert (group_a.project_idea, group_a.ssh_key_fingerprint) == before


def test_the_instructor_cannot_edit_a_students_group_through_the_student_pages(
    client_for, ines, group_a
):
    response = client_for(ines).post(
        reverse("labs:group_edit", args=[group_a.pk]),
        {"project_title": "x", "project_idea": "changed by staff"},
    )
    assert response.status_code == 404


def test_key_replacement_must_be_a_post(client_for, alice, group_a):
    assert client_for(alice).get(reverse("labs:group_key", args=[group_a.pk])).status_code == 405


def test_a_member_replaces_the_key_and_sees_the_new_fingerprint(
    client_for, alice, group_a, make_public_key
):
    response = client_for(alice).post(
        reverse("labs:group_key", args=[group_a.pk]),
        {"ssh_public_key": make_public_key()},
        follow=True,
    )
    group_a.refresh_from_db()
    assert group_a.ssh_key_fingerprint in response.content.decode()


def test_a_bad_replacement_key_is_explained(client_for, alice, group_a):
    response = client_for(alice).post(
        reverse("labs:group_key", args=[group_a.pk]), {"ssh_public_key": "ssh-dss AAAAB3Nza"}
    )
    assert response.status_code == 400
    assert b"DSA" in response.content


def test_an_approved_group_offers_only_a_new_key_and_refuses_edits(
    client_for, alice, ines, group_a
):
    group_approve(group=group_a, by=ines)
    client = client_for(alice)
    page = client.get(detail(group_a)).content.decode()
    assert "Approved" in page and reverse("labs:group_edit", args=[group_a.pk]) not in page
    assert reverse("labs:group_key", args=[group_a.pk]) in page  # takes effect at once
    response = client.post(
        reverse("labs:group_edit", args=[group_a.pk]),
        {"project_title": "x", "project_idea": "late change"},
    )
    assert b"approved" in response.content
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.APPROVED and group_a.project_idea != "late change"


def test_healthz_answers_without_a_login_and_says_nothing_else(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.content == b"ok\n"


# --- the live group page ---------------------------------------------------------------------


@pytest.fixture
def live_group(group_a, course, make_vm):
    from labs.models import Host, Image, VmTemplate

    vm = make_vm(group_a, name="vm1", ssh_port=22007)
    Host.objects.filter(pk=vm.host_id).update(ssh_address="lab.example.edu")
    VmTemplate.objects.create(course=course, image=Image.objects.get(), quota_vms=3, quota_vcpus=4)
    return vm


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
def test_the_group_page_shows_the_ssh_line_with_its_copy_button_and_the_quota_left(
    client_for, request, group_a, live_group, who
):
    page = client_for(request.getfixturevalue(who)).get(detail(group_a)).content.decode()
    ssh_id = f"ssh-{live_group.pk}"
    assert f'<code class="ssh" id="{ssh_id}">ssh -p 22007 student@lab.example.edu</code>' in page
    assert f'data-copy-target="{ssh_id}"' in page and 'aria-label="Copy the SSH command' in page
    assert "2 of 3 VMs left" in page and "3 of 4 vCPUs" in page
    assert "Add a VM</button>" in page and "Take snapshot (with memory)" in page


def test_a_group_at_its_quota_cannot_press_add_a_vm(client_for, alice, group_a, live_group):
    from labs.models import VmTemplate

    VmTemplate.objects.update(quota_vms=1)
    page = client_for(alice).get(detail(group_a)).content.decode()
    assert "0 of 1 VM left" in page
    assert f'aria-describedby="quota-{group_a.pk}" disabled>Add a VM' in page


def test_the_group_page_listens_to_its_own_group_only(client_for, alice, group_a, live_group):
    page = client_for(alice).get(detail(group_a)).content.decode()
    assert f'data-live-url="{detail(group_a)}" data-live-group="{group_a.pk}"' in page
    for region in ["group-head", "machines", f"vm-{live_group.pk}-state", "operations", "quota"]:
        assert f'data-live-region="{region}"' in page
    assert 'data-live-announce role="status" aria-live="polite"' in page
    assert "/static/js/live.js" in page and "/static/js/copy.js" in page
    assert "<script>" not in page  # no inline script element: only files the site serves


def test_a_live_refresh_leaves_the_flash_message_for_the_next_page_load(
    client_for, alice, group_a, live_group
):
    client = client_for(alice)
    client.post(reverse("labs:vm_operation", args=[live_group.pk, "reboot"]))
    refreshed = client.get(detail(group_a), headers={"X-Live-Refresh": "1"}).content.decode()
    assert "Reboot of vm1 is queued." in refreshed  # rendered, but not used up
    assert "Reboot of vm1 is queued." in client.get(detail(group_a)).content.decode()
    assert "Reboot of vm1 is queued." not in client.get(detail(group_a)).content.decode()


def test_a_hostile_vm_name_and_progress_stay_escaped_on_the_group_page(
    client_for, alice, group_a, live_group
):
    from labs.models import Operation, Vm

    Vm.objects.filter(pk=live_group.pk).update(name="<b>vm</b>", status_message="<i>x</i>")
    Operation.objects.create(vm=live_group, kind="reboot", progress="<script>p()</script>")
    page = client_for(alice).get(detail(group_a)).content.decode()
    assert "<b>vm</b>" not in page and "<i>x</i>" not in page and "<script>p()" not in page
    assert "Copy the SSH command of &lt;b&gt;vm&lt;/b&gt;" in page
    assert "&lt;script&gt;p()&lt;/script&gt;" in page


def test_the_group_page_makes_as_many_queries_for_three_busy_vms_as_for_one(
    client_for, alice, group_a, group_b, live_group, make_vm
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from labs.models import Operation, Snapshot

    client = client_for(alice)

    def queries() -> int:
        client.get(detail(group_a))  # the session and the user are loaded alike each time
        with CaptureQueriesContext(connection) as captured:
            assert client.get(detail(group_a)).status_code == 200
        return len(captured)

    one = queries()
    for name in ("vm2", "vm3"):
        vm = make_vm(group_a, name=name)
        Snapshot.objects.create(vm=vm, name="s1", with_memory=False)
        Operation.objects.create(vm=vm, kind="start", status="running")
        Operation.objects.create(vm=vm, kind="stop", status="failed", error="no")
    make_vm(group_b, name="vm1")  # other groups' VMs change nothing either
    assert queries() == one


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
def test_the_group_page_shows_each_vms_name_and_address_on_the_group_network(
    client_for, request, group_a, make_vm, who
):
    vm = make_vm(group_a, name="vm2", group_ip="10.200.3.17", group_mac="52:54:01:00:00:02")
    Host.objects.filter(pk=vm.host_id).update(group_networks=True)
    page = client_for(request.getfixturevalue(who)).get(detail(group_a)).content.decode()
    assert "Group network: <code>vm2 · 10.200.3.17</code>" in page


def test_a_vm_on_a_host_without_group_networks_shows_no_group_address(
    client_for, alice, group_a, make_vm
):
    make_vm(group_a, name="vm2", group_ip="10.200.3.17", group_mac="52:54:01:00:00:02")
    page = client_for(alice).get(detail(group_a)).content.decode()
    assert "Group network:" not in page


def test_another_groups_member_sees_nothing_of_the_group_network(
    client_for, carol, group_a, group_b, make_vm
):
    vm = make_vm(group_a, name="vm2", group_ip="10.200.3.17", group_mac="52:54:01:00:00:02")
    Host.objects.filter(pk=vm.host_id).update(group_networks=True)
    response = client_for(carol).get(detail(group_a))
    assert response.status_code == 404 and b"10.200.3.17" not in response.content
