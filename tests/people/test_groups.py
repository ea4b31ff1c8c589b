import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from labs.choices import GroupStatus, Role
from labs.models import Group, Membership
from labs.people.groups import (
    group_approve,
    group_key_replace,
    group_register,
    group_reject,
    group_update,
    usernames_parse,
)


def register(course, by, key, *, name="Gamma", members=()):
    return group_register(
        course=course,
        by=by,
        name=name,
        member_usernames=list(members),
        project_title="Title",
        project_idea="Idea",
        ssh_public_key=key,
    )


def messages_of(excinfo) -> str:
    return " ".join(excinfo.value.messages)


def test_usernames_are_split_on_commas_and_spaces_without_duplicates():
    assert usernames_parse(text=" bob, carol  dave;@erin\nBob ") == [
        "bob",
        "carol",
        "dave",
        "erin",
    ]


def test_signup_makes_a_pending_group_with_the_submitter_and_named_students(
    course, alice, bob, dave, make_public_key
):
    group = register(course, alice, make_public_key(), members=["BOB", "dave"])
    assert group.status == GroupStatus.PENDING
    members = set(group.memberships.values_list("user__username", flat=True))
    assert members == {"alice", "bob", "dave"}
    assert group.ssh_key_fingerprint.startswith("SHA256:")
    assert group.created_by == alice


def test_it_refuses_a_username_that_is_not_on_the_roster(course, alice, make_public_key):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), members=["mallory"])
    # Whether mallory exists is not the student's to learn: only that she cannot be added.
    assert "These usernames cannot be added: mallory." in messages_of(excinfo)
    assert not Group.objects.exists()


def test_it_refuses_a_student_of_another_course(course, alice, make_student, make_public_key):
    from labs.models import Course

    other = Course.objects.create(slug="db201", title="Databases")
    make_student("olga", in_course=other)
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), members=["olga"])
    assert "olga" in messages_of(excinfo)


def test_it_refuses_course_staff_as_members(course, alice, ines, make_public_key):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), members=["ines"])
    assert "These usernames cannot be added: ines." in messages_of(excinfo)


def test_it_refuses_a_student_already_in_a_group(course, group_b, alice, make_public_key):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), members=["carol"])
    assert "These usernames cannot be added: carol." in messages_of(excinfo)
    assert Membership.objects.get(user=alice).group is None


def test_a_submitter_already_in_a_group_cannot_sign_up_again(
    course, group_a, alice, make_public_key
):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), name="Again")
    assert "already in the group “Alpha”" in messages_of(excinfo)


def test_it_refuses_more_members_than_the_course_allows(course, make_student, make_public_key):
    people = [make_student(n) for n in ["p1", "p2", "p3", "p4", "p5"]]
    with pytest.raises(ValidationError) as excinfo:
        register(course, people[0], make_public_key(), members=["p2", "p3", "p4", "p5"])
    assert "at most 4 members including you; this one would have 5" in messages_of(excinfo)
    register(course, people[0], make_public_key(), members=["p2", "p3", "p4"])


def test_it_refuses_signup_outside_the_window(course, alice, make_public_key):
    course.signup_closes_at = timezone.now() - timedelta(minutes=1)
    course.save()
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key())
    assert "closed" in messages_of(excinfo)


def test_instructors_cannot_sign_up_a_group(course, ines, make_public_key):
    with pytest.raises(ValidationError) as excinfo:
        register(course, ines, make_public_key())
    assert "Only students" in messages_of(excinfo)


def test_the_same_key_cannot_serve_two_groups_of_a_course(course, alice, carol, make_public_key):
    key = make_public_key()
    register(course, alice, key, name="One")
    with pytest.raises(ValidationError) as excinfo:
        register(course, carol, key, name="Two")
    assert excinfo.value.message_dict["ssh_public_key"][0].startswith("Another group")


def test_group_names_are_unique_per_course_without_case(course, alice, carol, make_public_key):
    register(course, alice, make_public_key(), name="Kernel Hackers")
    with pytest.raises(ValidationError) as excinfo:
        register(course, carol, make_public_key(), name="kernel hackers")
    assert "already exists" in excinfo.value.message_dict["name"][0]


def test_a_bad_key_is_reported_against_the_key_field(course, alice):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    assert "ssh_public_key" in excinfo.value.message_dict
    assert not Group.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_signups_racing_for_one_student_leave_exactly_one_winner(
    course, alice, carol, dave, make_public_key
):
    keys = [make_public_key(), make_public_key()]
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def sign_up(by, name, key):
        try:
            barrier.wait()
            results[name] = register(course, by, key, name=name, members=["dave"])
        except Exception as error:  # noqa: BLE001 - the test inspects it below
            results[name] = error
        finally:
            connection.close()  # this thread's own connection

    threads = [
        threading.Thread(target=sign_up, args=(alice, "Left", keys[0])),
        threading.Thread(target=sign_up, args=(carol, "Right", keys[1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    winners = [r for r in results.values() if isinstance(r, Group)]
    losers = [r for r in results.values() if not isinstance(r, Group)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert isinstance(losers[0], ValidationError)
    assert "dave" in " ".join(losers[0].messages)
    assert Group.objects.count() == 1
    assert Membership.objects.get(user=dave).group == winners[0]


def test_members_edit_a_pending_group(group_a, bob):
    group_update(group=group_a, by=bob, project_title="New", project_idea="Better idea")
    group_a.refresh_from_db()
    assert (group_a.project_title, group_a.project_idea) == ("New", "Better idea")


def test_non_members_cannot_edit(group_a, carol):
    with pytest.raises(PermissionDenied):
        group_update(group=group_a, by=carol, project_title="X", project_idea="Y")


def test_an_approved_group_is_frozen_for_its_members(group_a, alice, ines):
    group_approve(group=group_a, by=ines)
    with pytest.raises(ValidationError) as excinfo:
        group_update(group=group_a, by=alice, project_title="X", project_idea="Y")
    assert "approved" in messages_of(excinfo)


def test_replacing_the_key_updates_the_fingerprint(group_a, alice, make_public_key):
    old = group_a.ssh_key_fingerprint
    group_key_replace(group=group_a, by=alice, ssh_public_key=make_public_key())
    group_a.refresh_from_db()
    assert group_a.ssh_key_fingerprint != old


def test_a_key_of_another_group_cannot_be_taken_over(group_a, group_b, alice):
    with pytest.raises(ValidationError) as excinfo:
        group_key_replace(group=group_a, by=alice, ssh_public_key=group_b.ssh_public_key)
    assert "Another group" in messages_of(excinfo)


def test_approval_records_who_and_when_and_emails_every_member(
    group_a, ines, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        group_approve(group=group_a, by=ines, note="Looks good")
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.APPROVED
    assert group_a.reviewed_by == ines and group_a.reviewed_at is not None
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@example.edu", "bob@example.edu"]
    assert "approved" in mail.outbox[0].subject.lower()
    assert "Looks good" in mail.outbox[0].body


def test_rejection_needs_a_note_and_a_member_edit_resubmits(
    group_a, ines, alice, django_capture_on_commit_callbacks
):
    with pytest.raises(ValidationError):
        group_reject(group=group_a, by=ines, note="  ")
    with django_capture_on_commit_callbacks(execute=True):
        group_reject(group=group_a, by=ines, note="Too vague: say what you will measure.")
    assert "Too vague" in mail.outbox[0].body
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.REJECTED
    group_update(group=group_a, by=alice, project_title="T", project_idea="We measure latency.")
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.PENDING


def test_only_the_courses_staff_review(group_a, alice, make_student):
    from labs.models import Course

    other = Course.objects.create(slug="net", title="Networks")
    outsider = make_student("tom", role=Role.INSTRUCTOR, in_course=other)
    for user in (alice, outsider):
        with pytest.raises(PermissionDenied):
            group_approve(group=group_a, by=user)
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.PENDING


# --- membership changes and console revocation ---------------------------------------------


def listen_for_revocations(vm_ids, action):
    """Run ``action`` (sync) while subscribed to the VMs' console groups; return messages."""
    import asyncio

    from asgiref.sync import async_to_sync, sync_to_async
    from channels.layers import get_channel_layer

    from labs.consoles.tickets import vm_group

    async def run():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        for vm_id in vm_ids:
            await layer.group_add(vm_group(vm_id), channel)
        await sync_to_async(action)()
        received = []
        try:
            while True:
                received.append(await asyncio.wait_for(layer.receive(channel), timeout=1))
        except TimeoutError:
            pass
        for vm_id in vm_ids:
            await layer.group_discard(vm_group(vm_id), channel)
        return received

    return async_to_sync(run)()


@pytest.fixture
def vm_of_a(group_a, make_vm):
    return make_vm(group_a)


@pytest.mark.django_db(transaction=True)
def test_removing_a_member_revokes_only_their_consoles(group_a, vm_of_a, bob, ines):
    from labs.people.groups import membership_group_set

    membership = Membership.objects.get(user=bob)
    messages = listen_for_revocations(
        [vm_of_a.pk], lambda: membership_group_set(membership=membership, group=None, by=ines)
    )
    assert [(m["type"], m["user_id"]) for m in messages] == [("console.revoke", bob.pk)]
    assert Membership.objects.get(user=bob).group is None


@pytest.mark.django_db(transaction=True)
def test_rejecting_a_group_revokes_every_console_of_its_vms(group_a, vm_of_a, ines):
    messages = listen_for_revocations(
        [vm_of_a.pk], lambda: group_reject(group=group_a, by=ines, note="Off topic.")
    )
    assert [(m["type"], m["user_id"]) for m in messages] == [("console.revoke", None)]


def test_staff_move_students_between_groups_within_the_rules(group_a, group_b, bob, ines, alice):
    from labs.people.groups import membership_group_set

    membership = Membership.objects.get(user=bob)
    membership_group_set(membership=membership, group=group_b, by=ines)
    assert Membership.objects.get(user=bob).group == group_b
    with pytest.raises(PermissionDenied):
        membership_group_set(membership=membership, group=None, by=alice)
    with pytest.raises(ValidationError, match="Only students"):
        membership_group_set(membership=Membership.objects.get(user=ines), group=group_a, by=ines)


@pytest.mark.parametrize("bad", ["Alpha\nBeta", "Alpha\u202eahplA", "Al\x00pha", "Al\u200dpha"])
def test_a_group_name_or_title_refuses_control_and_direction_characters(
    course, alice, make_public_key, bad
):
    with pytest.raises(ValidationError) as excinfo:
        register(course, alice, make_public_key(), name=bad)
    assert "one line of plain text" in excinfo.value.message_dict["name"][0]
    assert not Group.objects.exists()


# --- consent: a named member confirms or leaves the pending group ---------------------------


def test_a_named_member_sees_the_pending_group_and_confirms_it(client_for, group_a, bob):
    home = client_for(bob).get(reverse("labs:home")).content.decode()
    assert "alice signed you up for this group" in home
    client_for(bob).post(reverse("labs:group_confirm", args=[group_a.pk]))
    assert Membership.objects.get(user=bob).confirmed_at is not None
    assert "signed you up" not in client_for(bob).get(reverse("labs:home")).content.decode()


def test_a_named_member_declines_and_leaves_the_pending_group(client_for, group_a, alice, bob):
    response = client_for(bob).post(reverse("labs:group_decline", args=[group_a.pk]), follow=True)
    assert "You left “Alpha”" in response.content.decode()
    assert Membership.objects.get(user=bob).group is None
    assert list(group_a.memberships.values_list("user__username", flat=True)) == ["alice"]


def test_the_submitter_cannot_decline_and_nobody_declines_a_reviewed_group(
    client_for, group_a, alice, bob, ines
):
    client_for(alice).post(reverse("labs:group_decline", args=[group_a.pk]))
    assert Membership.objects.get(user=alice).group == group_a
    group_approve(group=group_a, by=ines)
    client_for(bob).post(reverse("labs:group_decline", args=[group_a.pk]))
    assert Membership.objects.get(user=bob).group == group_a


def test_another_student_cannot_confirm_or_decline(client_for, group_a, carol):
    response = client_for(carol).post(reverse("labs:group_decline", args=[group_a.pk]))
    assert response.status_code == 404


def test_the_reviewer_sees_who_confirmed(client_for, group_a, ines):
    page = client_for(ines).get(reverse("admin:labs_group_changelist")).content.decode()
    assert "alice, bob?" in page  # the submitter confirmed by signing up; bob not yet
