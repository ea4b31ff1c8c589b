"""Asking for a cold move: who may, and what is refused with which reason (the move itself,
on two real hosts, is tests/integration/test_two_hosts.py)."""

import pytest

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute.moves import vm_move_request
from labs.errors import Invalid, NotAllowed, Refused
from labs.models import Host, Operation, Snapshot


@pytest.fixture
def h2(db):
    return Host.objects.create(
        name="h2",
        uri="qemu:///system",
        vcpus=8,
        memory_mib=16384,
        disk_gib=200,
        ssh_port_min=23000,
        ssh_port_max=23001,
        published_port_min=23100,
        published_port_max=23199,
    )


@pytest.fixture
def stopped(make_vm, group_a):
    return make_vm(group_a, observed_state=ObservedState.SHUTOFF, ssh_port=22000)


def test_a_running_vm_without_snapshots_moves_live(make_vm, group_a, h2, ines, sent):
    running = make_vm(group_a, ssh_port=22000)
    assert vm_move_request(vm=running, to=h2, by=ines).params["live"] is True


def test_an_instructor_asks_and_the_destination_and_its_port_are_recorded(stopped, h2, ines, sent):
    op = vm_move_request(vm=stopped, to=h2, by=ines)
    assert op.kind == OperationKind.MOVE and op.status == OperationStatus.QUEUED
    assert op.params == {"host": h2.pk, "from": stopped.host_id, "ssh_port": 23000, "live": False}
    assert sent == [op.pk]
    stopped.refresh_from_db()
    assert stopped.host.name == "h1"  # nothing changes until the move has succeeded


def test_two_moves_to_one_host_take_different_ports_and_a_third_finds_none(
    make_vm, group_a, group_b, h2, ines, sent
):
    first = make_vm(group_a, observed_state=ObservedState.SHUTOFF, ssh_port=22000)
    second = make_vm(group_b, observed_state=ObservedState.SHUTOFF, ssh_port=22001)
    third = make_vm(group_b, name="vm2", observed_state=ObservedState.SHUTOFF, ssh_port=22002)
    ports = [vm_move_request(vm=v, to=h2, by=ines).params["ssh_port"] for v in (first, second)]
    assert ports == [23000, 23001]
    with pytest.raises(Refused, match="Host h2 has no free SSH port"):
        vm_move_request(vm=third, to=h2, by=ines)


def test_students_and_tas_may_not_move_a_vm(stopped, h2, alice, tara):
    for user in (alice, tara):
        with pytest.raises(NotAllowed, match="instructors and operators"):
            vm_move_request(vm=stopped, to=h2, by=user)
    assert not Operation.objects.exists()


def test_a_running_vm_its_own_host_and_a_disabled_host_are_refused_with_the_reason(
    make_vm, group_a, stopped, h2, ines
):
    paused = make_vm(group_a, name="vm2", ssh_port=22001, observed_state=ObservedState.PAUSED)
    with pytest.raises(Refused, match="vm2 is paused: only a running VM"):
        vm_move_request(vm=paused, to=h2, by=ines)
    running = make_vm(group_a, name="vm3", ssh_port=22002)
    Snapshot.objects.create(vm=running, name="s1", with_memory=True)
    with pytest.raises(Refused, match="vm3 has snapshots, which a live move cannot take"):
        vm_move_request(vm=running, to=h2, by=ines)
    with pytest.raises(Invalid, match="vm1 is on h1 already"):
        vm_move_request(vm=stopped, to=stopped.host, by=ines)
    Host.objects.filter(pk=h2.pk).update(enabled=False)
    with pytest.raises(Refused, match="Host h2 is disabled"):
        vm_move_request(vm=stopped, to=h2, by=ines)
    Host.objects.filter(pk=h2.pk).update(enabled=True, draining=True)
    with pytest.raises(Refused, match="Host h2 is draining"):
        vm_move_request(vm=stopped, to=h2, by=ines)
    Host.objects.filter(pk=h2.pk).update(draining=False, memory_mib=512)
    with pytest.raises(Refused, match="Host h2 has no room for vm1"):
        vm_move_request(vm=stopped, to=h2, by=ines)
    assert not Operation.objects.exists()


def test_a_drain_sends_each_vm_to_an_up_host_with_room_by_the_course_policy(stopped, h2, course):
    from labs.choices import PlacementPolicy
    from labs.compute.placement import move_destination

    h3 = Host.objects.create(
        name="h3", uri="qemu:///system", vcpus=8, memory_mib=4096, disk_gib=200
    )
    assert move_destination(vm=stopped, away_from=stopped.host) == h2  # spread: most free
    course.placement = PlacementPolicy.PACK
    course.save(update_fields=["placement"])
    assert move_destination(vm=stopped, away_from=stopped.host) == h3  # pack: least free
    Host.objects.filter(pk=h3.pk).update(draining=True)
    assert move_destination(vm=stopped, away_from=stopped.host) == h2
    Host.objects.filter(pk=h2.pk).update(memory_mib=512)
    assert move_destination(vm=stopped, away_from=stopped.host) is None


# --- the admin's action ---------------------------------------------------------------------


def test_the_admin_action_asks_which_host_then_moves_each_vm_or_says_why_not(
    client_for, make_vm, group_a, h2, ines, sent
):
    from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
    from django.urls import reverse

    stopped = make_vm(group_a, observed_state=ObservedState.SHUTOFF, ssh_port=22000)
    paused = make_vm(group_a, name="vm2", ssh_port=22001, observed_state=ObservedState.PAUSED)
    url = reverse("admin:labs_vm_changelist")
    chosen = {"action": "move", ACTION_CHECKBOX_NAME: [stopped.pk, paused.pk]}
    client = client_for(ines)
    page = client.post(url, chosen).content.decode()
    assert "Move VMs to another host" in page and f'<option value="{h2.pk}"' in page
    response = client.post(url, {**chosen, "host": h2.pk}, follow=True)
    text = response.content.decode()
    assert "Asked for 1 move(s) to h2" in text
    assert "vm2 is paused: only a running VM" in text
    (op,) = Operation.objects.all()
    assert op.vm == stopped and op.kind == OperationKind.MOVE and op.requested_by == ines


def test_a_ta_gets_no_move_in_the_admin(client_for, make_vm, group_a, h2, tara):
    from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
    from django.urls import reverse

    stopped = make_vm(group_a, observed_state=ObservedState.SHUTOFF, ssh_port=22000)
    url = reverse("admin:labs_vm_changelist")
    client = client_for(tara)
    response = client.post(
        url, {"action": "move", ACTION_CHECKBOX_NAME: [stopped.pk], "host": h2.pk}, follow=True
    )
    assert "Only the course&#x27;s instructors and operators move VMs" in response.content.decode()
    assert not Operation.objects.exists()


def test_a_new_vm_is_not_given_the_port_a_move_on_its_way_has_taken(
    stopped, h2, ines, group_b, sent
):
    from labs.compute.placement import vm_place
    from labs.models import Vm

    Host.objects.exclude(pk=h2.pk).update(enabled=False)
    move = vm_move_request(vm=stopped, to=h2, by=ines)
    assert move.params["ssh_port"] == 23000
    vm = Vm.objects.create(
        group=group_b, name="vm9", image=stopped.image, vcpus=1, memory_mib=1024, disk_gib=10
    )
    assert vm_place(vm=vm) and vm.host == h2 and vm.ssh_port == 23001
