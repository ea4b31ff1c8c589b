"""The published-ports forms of the group page (labs/views_ports.py) for the cast: a
member publishes, a teammate and the instructor unpublish, another group's member gets a
404 everywhere, anonymous users are sent to sign in, every form needs its CSRF token, and
a refusal reads as a message naming the port. The page lists each publication as its
address (a link while the VM runs, closed while it does not)."""

import pytest
from django.test import Client
from django.urls import reverse

from labs.choices import ObservedState, OperationKind, PortState
from labs.models import Operation, Publication

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    """Deliveries recorded instead of sent to the broker."""
    from labs.compute import dispatch

    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "t-1")
    return ids


@pytest.fixture
def vms(group_a, group_b, make_vm, sent):
    return make_vm(group_a, ssh_port=22000), make_vm(group_b, ssh_port=22001)


@pytest.fixture
def published(vms):
    vm_a, _ = vms
    return Publication.objects.create(
        vm=vm_a, host=vm_a.host, host_port=23004, guest_port=80, state=PortState.PUBLISHED
    )


def publish(client, vm, port="80"):
    return client.post(
        reverse("labs:vm_port_publish", args=[vm.pk]), {"guest_port": port}, follow=True
    )


def test_a_member_publishes_and_the_page_says_where(client_for, alice, vms):
    vm_a, _ = vms
    page = publish(client_for(alice), vm_a).content.decode()
    op = Operation.objects.get(kind=OperationKind.PORT_PUBLISH)
    assert (op.vm, op.requested_by, op.params["guest_port"]) == (vm_a, alice, 80)
    assert "Publishing port 80 of vm1 on port 23000 is queued." in page
    assert "opening…" in page


def test_the_page_links_an_open_port_and_shows_it_closed_while_the_vm_is_off(
    client_for, bob, vms, published
):
    vm_a, _ = vms
    client = client_for(bob)
    page = client.get(reverse("labs:group_detail", args=[vm_a.group_id])).content.decode()
    assert 'href="http://127.0.0.1:23004/"' in page
    vm_a.observed_state = ObservedState.SHUTOFF
    vm_a.save(update_fields=["observed_state"])
    page = client.get(reverse("labs:group_detail", args=[vm_a.group_id])).content.decode()
    assert 'href="http://127.0.0.1:23004/"' not in page
    assert "127.0.0.1:23004" in page and "closed while vm1 is not running" in page


def test_a_teammate_and_the_instructor_unpublish(client_for, bob, ines, vms, published):
    page = client_for(bob).post(reverse("labs:port_unpublish", args=[published.pk]), follow=True)
    assert "Closing port 80 of vm1 is queued." in page.content.decode()
    op = Operation.objects.get()
    assert (op.kind, op.requested_by, op.params["publication"]) == (
        "port_unpublish",
        bob,
        published.pk,
    )
    assert Publication.objects.get().state == PortState.CLOSING
    Operation.objects.update(status="succeeded")
    client_for(ines).post(
        reverse("labs:vm_port_publish", args=[published.vm_id]), {"guest_port": "443"}
    )
    assert Operation.objects.filter(kind="port_publish", requested_by=ines).exists()


def test_another_groups_member_gets_a_404_and_changes_nothing(client_for, carol, vms, published):
    vm_a, vm_b = vms
    client = client_for(carol)
    assert publish(client, vm_a).status_code == 404
    assert client.post(reverse("labs:port_unpublish", args=[published.pk])).status_code == 404
    assert not Operation.objects.exists()
    page = client.get(reverse("labs:group_detail", args=[vm_b.group_id])).content.decode()
    assert "23004" not in page


def test_anonymous_users_are_sent_to_sign_in(client, vms, published):
    vm_a, _ = vms
    reply = client.post(reverse("labs:vm_port_publish", args=[vm_a.pk]), {"guest_port": "80"})
    assert reply.status_code == 302 and "/login" in reply["Location"]
    reply = client.post(reverse("labs:port_unpublish", args=[published.pk]))
    assert reply.status_code == 302 and "/login" in reply["Location"]
    assert not Operation.objects.exists()


def test_a_post_without_its_csrf_token_is_refused_and_a_get_is_not_allowed(alice, vms):
    vm_a, _ = vms
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    url = reverse("labs:vm_port_publish", args=[vm_a.pk])
    assert client.post(url, {"guest_port": "80"}).status_code == 403
    assert client.get(url).status_code == 405
    assert not Publication.objects.exists()


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("25", "Guest port 25 may not be published in this course."),
        ("22", "Guest port 22 may not be published in this course (SSH"),
        ("http", "A guest port is a whole number from 1 to 65535"),
    ],
)
def test_a_refusal_is_a_message_naming_the_port(client_for, alice, vms, port, message):
    vm_a, _ = vms
    page = publish(client_for(alice), vm_a, port).content.decode()
    assert message in page.replace("&#x27;", "'")
    assert not Publication.objects.exists()


def test_the_form_says_how_many_ports_the_group_has_left(client_for, alice, vms, published):
    vm_a, _ = vms
    page = client_for(alice).get(reverse("labs:group_detail", args=[vm_a.group_id]))
    assert "2 of 3 left for your group." in page.content.decode()
