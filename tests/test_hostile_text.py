"""Hostile text in every field is stored as typed and shown escaped, never breaking a page."""

import pytest
from django.urls import reverse

from labs.models import Group

pytestmark = pytest.mark.django_db

HOSTILE = "<script>alert('x')</script> & \"quoted\" <b>bold</b> Ünïcødé 🚀 שלום"


@pytest.fixture
def hostile_group(client_for, alice, bob, make_public_key):
    client = client_for(alice)
    response = client.post(
        reverse("labs:group_signup", args=["os101"]),
        {
            "name": HOSTILE[:80],
            "members": "bob",
            "project_title": (HOSTILE * 5)[:200],
            "project_idea": (HOSTILE + "\n") * 70,
            "ssh_public_key": make_public_key(HOSTILE),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    return Group.objects.get()


def assert_escaped(page: str):
    assert "<script>alert" not in page
    assert "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in page
    assert "Ünïcødé 🚀 שלום" in page


def test_it_is_stored_exactly_as_typed(hostile_group):
    assert hostile_group.name == HOSTILE[:80]
    assert hostile_group.project_idea.startswith(HOSTILE)
    assert len(hostile_group.project_idea) > 4000


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
def test_the_group_page_shows_it_escaped(client_for, hostile_group, request, who):
    user = request.getfixturevalue(who)
    response = client_for(user).get(reverse("labs:group_detail", args=[hostile_group.pk]))
    assert response.status_code == 200
    assert_escaped(response.content.decode())


def test_the_home_page_shows_the_name_escaped(client_for, alice, hostile_group):
    page = client_for(alice).get(reverse("labs:home")).content.decode()
    assert "<script>alert" not in page and "&lt;script&gt;" in page


def test_the_admin_shows_it_escaped(client_for, ines, hostile_group):
    client = client_for(ines)
    listing = client.get(reverse("admin:labs_group_changelist")).content.decode()
    assert "<script>alert" not in listing and "&lt;script&gt;" in listing
    change = client.get(reverse("admin:labs_group_change", args=[hostile_group.pk]))
    assert "<script>alert" not in change.content.decode()


def test_too_long_input_is_refused_with_a_message_not_an_error_page(
    client_for, dave, make_public_key
):
    response = client_for(dave).post(
        reverse("labs:group_signup", args=["os101"]),
        {
            "name": "x" * 500,
            "members": "",
            "project_title": "t",
            "project_idea": "i" * 6000,
            "ssh_public_key": make_public_key(),
        },
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "Ensure this value has at most 80 characters" in page
    assert "at most 5000 characters" in page
    assert not Group.objects.exists()


# Control and direction-changing characters in the one-line names no form field covers.
INVISIBLE = ["\u202e", "\u2066", "\u200d", "\x00", "\x1b"]


@pytest.mark.parametrize("character", INVISIBLE)
def test_a_snapshot_name_refuses_control_and_direction_characters(
    make_vm, group_a, alice, character
):
    from labs.choices import OperationKind
    from labs.compute.requests import vm_operation_request
    from labs.errors import Invalid
    from labs.models import Operation

    vm = make_vm(group_a)
    with pytest.raises(Invalid, match="letters, digits"):
        vm_operation_request(
            vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": f"lab{character}2"}
        )
    assert not Operation.objects.exists()


@pytest.mark.parametrize("character", INVISIBLE)
def test_a_roster_username_refuses_control_and_direction_characters(course, character):
    from django.contrib.auth import get_user_model

    from labs.people.roster import RosterError, roster_import

    data = f"username,email\nok,ok@example.edu\nev{character}e,eve@example.edu\n".encode()
    with pytest.raises(RosterError) as refused:
        roster_import(course=course, data=data)
    assert refused.value.errors[0].startswith("line 3:")
    assert not get_user_model().objects.filter(username="ok").exists()  # nothing half-done
