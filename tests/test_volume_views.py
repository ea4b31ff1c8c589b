"""The volume forms of the group page (labs/views_volumes.py) for the cast: members and
teammates add, attach, detach and delete; another group's member gets a 404 everywhere;
anonymous users are sent to sign in; the course's instructor may act too."""

import pytest
from django.test import Client
from django.urls import reverse

from labs.choices import ObservedState, OperationKind, VolumeState
from labs.models import Operation, Snapshot, VmTemplate, Volume

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    """Deliveries recorded instead of sent to the broker."""
    from labs.compute import dispatch

    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "t-1")
    return ids


@pytest.fixture
def vms(group_a, group_b, course, make_vm, sent):
    vm_a = make_vm(group_a, ssh_port=22000)
    vm_b = make_vm(group_b, ssh_port=22001)
    VmTemplate.objects.create(course=course, image=vm_a.image, quota_disk_gib=30)
    return vm_a, vm_b


@pytest.fixture
def detached(vms):
    vm_a, _ = vms
    return Volume.objects.create(
        group=vm_a.group, name="data", size_gib=2, host=vm_a.host, state=VolumeState.READY
    )


@pytest.fixture
def attached(vms):
    vm_a, _ = vms
    return Volume.objects.create(
        group=vm_a.group,
        name="logs",
        size_gib=1,
        host=vm_a.host,
        vm=vm_a,
        state=VolumeState.READY,
    )


def add(client, vm, **data):
    return client.post(reverse("labs:vm_volume_add", args=[vm.pk]), data, follow=True)


def test_a_member_adds_a_volume_and_it_is_queued_on_the_vm(client_for, alice, vms):
    vm_a, _ = vms
    page = add(client_for(alice), vm_a, name="data", size_gib="3").content.decode()
    op = Operation.objects.get(kind=OperationKind.VOLUME_CREATE)
    assert (op.vm, op.requested_by, op.params["name"]) == (vm_a, alice, "data")
    assert Volume.objects.get().size_gib == 3
    assert "Volume data for vm1 is queued." in page


def test_a_teammate_detaches_and_the_instructor_attaches(client_for, bob, ines, vms, attached):
    vm_a, _ = vms
    client_for(bob).post(reverse("labs:volume_detach", args=[attached.pk]))
    op = Operation.objects.get()
    assert (op.kind, op.vm, op.requested_by) == ("volume_detach", vm_a, bob)
    Operation.objects.update(status="succeeded")
    Volume.objects.filter(pk=attached.pk).update(vm=None)
    page = client_for(ines).post(
        reverse("labs:vm_volume_attach", args=[vm_a.pk]), {"volume": attached.pk}, follow=True
    )
    assert "Attaching logs to vm1 is queued." in page.content.decode()
    assert Operation.objects.filter(kind="volume_attach", requested_by=ines).exists()


def test_a_member_deletes_a_detached_volume(client_for, alice, vms, detached):
    client_for(alice).post(reverse("labs:volume_delete", args=[detached.pk]))
    op = Operation.objects.get()
    assert (op.kind, op.params["volume"]) == ("volume_delete", detached.pk)


def test_another_groups_member_gets_a_404_on_every_volume_endpoint(
    client_for, carol, vms, detached, attached
):
    vm_a, vm_b = vms
    client = client_for(carol)
    urls = [
        (reverse("labs:vm_volume_add", args=[vm_a.pk]), {"name": "x", "size_gib": "1"}),
        (reverse("labs:vm_volume_attach", args=[vm_a.pk]), {"volume": detached.pk}),
        # Her own VM, another group's volume: still a 404.
        (reverse("labs:vm_volume_attach", args=[vm_b.pk]), {"volume": detached.pk}),
        (reverse("labs:volume_detach", args=[attached.pk]), {}),
        (reverse("labs:volume_delete", args=[detached.pk]), {}),
    ]
    for url, data in urls:
        assert client.post(url, data).status_code == 404, url
    assert not Operation.objects.exists()


def test_anonymous_users_are_sent_to_sign_in(client, vms, detached):
    vm_a, _ = vms
    for url in (
        reverse("labs:vm_volume_add", args=[vm_a.pk]),
        reverse("labs:volume_delete", args=[detached.pk]),
    ):
        response = client.post(url, {"name": "x", "size_gib": "1"})
        assert response.status_code == 302 and "login" in response["Location"]
    assert not Operation.objects.exists() and Volume.objects.count() == 1


def test_the_forms_need_a_post_and_the_csrf_token(alice, vms, detached):
    vm_a, _ = vms
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    url = reverse("labs:volume_delete", args=[detached.pk])
    assert client.get(url).status_code == 405
    assert client.post(url).status_code == 403
    assert not Operation.objects.exists()


def test_refusals_come_back_as_a_message_on_the_group_page(client_for, alice, vms, attached):
    vm_a, _ = vms
    client = client_for(alice)
    page = add(client, vm_a, name="Bad Name!", size_gib="1").content.decode()
    assert "A volume name uses a-z, 0-9 and" in page
    page = add(client, vm_a, name="big", size_gib="500").content.decode()
    assert "Over your group&#x27;s quota for disk" in page
    page = add(client, vm_a, name="x", size_gib="lots").content.decode()
    assert "The size must be a whole number." in page
    page = client.post(reverse("labs:volume_delete", args=[attached.pk]), follow=True)
    assert "attached to vm1: detach it first" in page.content.decode()
    assert not Operation.objects.exists()


def test_the_group_page_shows_volumes_their_serial_path_and_what_snapshots_hold(
    client_for, alice, vms, detached, attached, group_a
):
    vm_a, _ = vms
    Snapshot.objects.create(
        vm=vm_a,
        name="s1",
        with_memory=True,
        volumes=[{"id": attached.pk, "name": "logs", "serial": attached.serial}],
    )
    text = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    assert f'data-live-region="vm-{vm_a.pk}-volumes"' in text
    assert f"/dev/disk/by-id/virtio-{attached.serial}" in text
    assert "s1 holds logs" in text
    assert f'<option value="{detached.pk}">data (2 GiB)</option>' in text  # attachable
    assert 'data-live-region="volumes"' in text and "detached" in text
    # 10 GiB system disk + 1 GiB of saved memory + 3 GiB of volumes, of a 30 GiB quota.
    assert "16 GiB of disk quota left" in text


def test_a_stopped_vm_offers_volumes_too_and_one_suspended_to_disk_does_not(
    client_for, alice, vms, group_a
):
    vm_a, _ = vms
    url = reverse("labs:group_detail", args=[group_a.pk])
    for state, offered in ((ObservedState.SHUTOFF, True), (ObservedState.SAVED, False)):
        vm_a.observed_state = state
        vm_a.save(update_fields=["observed_state"])
        text = client_for(alice).get(url).content.decode()
        assert (reverse("labs:vm_volume_add", args=[vm_a.pk]) in text) is offered


def test_the_admin_lists_volumes_read_only_with_the_groups_quota(client_for, vms, attached):
    from django.contrib.auth import get_user_model

    root = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    client = client_for(root)
    page = client.get(reverse("admin:labs_volume_changelist")).content.decode()
    assert "logs" in page and attached.serial in page and "11 / 30" in page
    assert client.get(reverse("admin:labs_volume_add")).status_code == 403
