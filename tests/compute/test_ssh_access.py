"""SSH access follows the group: which changes ask the guests for an update, and when.

What the guest does with an update is the integration test's (tests/integration/
test_one_guest.py, on a real guest and its agent); here the rows: which VMs get an
``ssh_sync`` Operation, which wait for the sweeper, and what the seed gives.
"""

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute import ssh_access
from labs.compute.executors import vm_seed
from labs.drivers.cloudinit import seed_read
from labs.models import Membership, Operation, Vm
from labs.people.groups import group_key_replace, membership_group_set

pytestmark = pytest.mark.django_db


def _syncs(vm: Vm) -> list[Operation]:
    return list(vm.operations.filter(kind=OperationKind.SSH_SYNC).order_by("pk"))


def _finish(op: Operation, status=OperationStatus.SUCCEEDED) -> None:
    Operation.objects.filter(pk=op.pk).update(status=status)


def test_a_member_taken_out_disables_their_account_on_the_running_vms(
    alice, bob, ines, group_a, make_vm, sent
):
    running = make_vm(group_a, name="vm1")
    stopped = make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF)
    assert ssh_access.access_wanted(running).accounts == ["student", "alice", "bob"]

    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)

    [op] = _syncs(running)
    assert sent == [op.pk] and op.requested_by is None  # Stratus itself asked
    assert ssh_access.access_wanted(running).accounts == ["student", "alice"]
    assert _syncs(stopped) == []  # it follows when it starts
    group_a.refresh_from_db()
    assert group_a.key_replacement_advised


def test_a_stopped_vm_gets_the_change_when_it_runs_again(alice, bob, ines, group_a, make_vm, sent):
    vm = make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    assert ssh_access.syncs_due_request() == 0  # still off: nothing to update

    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.RUNNING)
    ssh_access.vm_started(vm)
    assert ssh_access.syncs_due_request() == 1
    assert len(_syncs(vm)) == 1
    assert ssh_access.syncs_due_request() == 0  # asked once, not on every sweep


def test_a_busy_vm_gets_the_change_once_its_operation_ends(
    alice, bob, ines, group_a, make_vm, sent
):
    vm = make_vm(group_a)
    reboot = Operation.objects.create(vm=vm, kind=OperationKind.REBOOT)
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    assert _syncs(vm) == []

    _finish(reboot)
    assert ssh_access.syncs_due_request() == 1
    assert len(_syncs(vm)) == 1


def test_a_failed_update_is_tried_again_on_the_next_change_or_start_not_every_sweep(
    alice, bob, ines, group_a, make_vm, sent
):
    vm = make_vm(group_a)
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    [failed] = _syncs(vm)
    _finish(failed, OperationStatus.FAILED)
    assert ssh_access.syncs_due_request() == 0

    ssh_access.vm_started(vm)  # e.g. the VM was rebooted
    assert ssh_access.syncs_due_request() == 1


def test_an_update_that_succeeded_leaves_nothing_due(alice, bob, ines, group_a, make_vm, sent):
    vm = make_vm(group_a)
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    [op] = _syncs(vm)
    vm.refresh_from_db()
    ssh_access.access_given(vm, ssh_access.access_wanted(vm), since=op.created_at)
    _finish(op)
    vm.refresh_from_db()
    assert not vm.ssh_sync_due
    ssh_access.vm_started(vm)
    assert ssh_access.syncs_due_request() == 0


def test_an_approved_groups_new_key_takes_effect_at_once(
    client_for, alice, group_a, make_vm, make_public_key, sent
):
    vm = make_vm(group_a)
    old_key = group_a.ssh_public_key
    response = client_for(alice).post(
        reverse("labs:group_key", args=[group_a.pk]),
        {"ssh_public_key": make_public_key("alpha-2")},
        follow=True,
    )
    assert "the old key stops working there" in response.content.decode()
    group_a.refresh_from_db()
    assert group_a.status == "approved" and group_a.ssh_key_changed_at is not None
    assert len(_syncs(vm)) == 1
    assert ssh_access.access_wanted(vm).key == group_a.ssh_public_key != old_key


def test_replacing_a_key_with_itself_changes_nothing(alice, group_a, make_vm, sent):
    vm = make_vm(group_a)
    group_key_replace(group=group_a, by=alice, ssh_public_key=group_a.ssh_public_key)
    assert _syncs(vm) == []


def test_a_key_replaced_after_a_member_left_ends_the_pages_advice(
    client_for, alice, bob, ines, group_a, make_vm, make_public_key, sent
):
    make_vm(group_a)
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content
    assert b"data-key-advice" in page and b"may still have the group's private key" in page
    group_key_replace(group=group_a, by=alice, ssh_public_key=make_public_key("alpha-3"))
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content
    assert b"data-key-advice" not in page
    assert b"Everyone in the group is root on its VMs" in page


def test_a_member_who_joins_gets_an_account(alice, bob, carol, ines, group_a, make_vm, sent):
    vm = make_vm(group_a)
    membership_group_set(membership=carol.memberships.get(), group=group_a, by=ines)
    assert ssh_access.access_wanted(vm).accounts == ["student", "alice", "bob", "carol"]
    assert len(_syncs(vm)) == 1
    group_a.refresh_from_db()
    assert not group_a.key_replacement_advised  # nobody left


def test_a_deactivated_member_loses_their_account(alice, bob, group_a, make_vm, sent):
    vm = make_vm(group_a)
    bob.is_active = False
    bob.save()
    assert ssh_access.access_wanted(vm).accounts == ["student", "alice"]
    assert len(_syncs(vm)) == 1


def test_a_membership_deleted_disables_the_account(alice, bob, group_a, make_vm, sent):
    vm = make_vm(group_a)
    Membership.objects.filter(user=bob).delete()
    assert ssh_access.access_wanted(vm).accounts == ["student", "alice"]
    assert len(_syncs(vm)) == 1


def test_a_pending_groups_key_change_touches_no_vm(alice, group_a, make_public_key, sent):
    group_key_replace(group=group_a, by=alice, ssh_public_key=make_public_key("alpha-4"))
    assert not Operation.objects.exists()


def test_the_seed_and_the_update_give_the_same_accounts(alice, bob, group_a, make_vm):
    user = get_user_model().objects.create_user("Not.A.Linux.Name")
    Membership.objects.create(course=group_a.course, user=user, group=group_a)
    vm = make_vm(group_a, instance_id="i-1")
    access = ssh_access.access_wanted(vm)
    assert access.accounts == ["student", "alice", "bob"]  # no Linux name: no account
    seed = seed_read(vm_seed(vm, access))["user-data"]
    for name in access.accounts:
        assert f'"name": "{name}"' in seed or f'"name":"{name}"' in seed
    assert access.key in seed


def test_a_revert_makes_the_guest_due_for_an_update(alice, group_a, make_vm):
    vm = make_vm(group_a)
    ssh_access.access_reset(vm, ssh_access.access_wanted(vm), since=vm.created_at)
    ssh_access.vm_access_unknown(vm)
    vm.refresh_from_db()
    assert vm.ssh_sync_due


def test_the_accounts_given_accumulate_until_a_reset(alice, bob, group_a, make_vm):
    vm = make_vm(group_a)
    first = ssh_access.access_wanted(vm)
    ssh_access.access_reset(vm, first, since=vm.created_at)
    later = ssh_access.Access(accounts=["student", "alice"], key="ssh-ed25519 AAAA new")
    ssh_access.access_given(vm, later, since=vm.created_at)
    vm.refresh_from_db()
    assert vm.ssh_accounts == ["student", "alice", "bob"]  # bob stays listed: to disable
    assert vm.ssh_keys == [first.key, later.key]
    ssh_access.access_reset(vm, later, since=vm.created_at)
    vm.refresh_from_db()
    assert vm.ssh_accounts == ["student", "alice"] and vm.ssh_keys == [later.key]
