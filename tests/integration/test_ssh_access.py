"""SSH access follows the group on a real guest, through its agent, without a reset.

One booted guest walks through: a member taken out (their login refused, the others'
work), the group's key replaced (the old key refused, the new one works), a member added
(an account of their own, with sudo), and a revert to a snapshot taken before all that
(the old accounts and key come back on the disk; the update that follows the revert
takes them out again). The guest's boot id never changes: no reset, no reboot.
"""

import time

import pytest

from labs.choices import OperationKind, OperationStatus
from labs.compute.requests import vm_operation_request
from labs.models import Operation, Vm
from labs.people.groups import group_key_replace, membership_group_set

from .conftest import approve_new_group, keypair, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def _last_sync(vm: Vm, after: int) -> Operation:
    def made():
        return vm.operations.filter(kind=OperationKind.SSH_SYNC, pk__gt=after).first()

    wait_for(made, timeout=30, what="an SSH-access update to be asked for")
    return wait_operation(made(), timeout=180)


def _answer(key, port, command="true", user="student"):
    """``command`` run as ``user`` with ``key``: sshd's own answer, whether it let the user in
    or refused them. A connection that failed otherwise (ssh's 255 without a refusal: a guest
    slow to answer under TCG) is tried again, so that no answer can come from a timeout."""
    for attempt in range(6):
        result = ssh(key, port, command, user=user, timeout=60)
        if result.returncode != 255 or "Permission denied" in result.stderr:
            return result
        time.sleep(2 * attempt + 1)  # a busy guest's sshd resets new connections for a while
    raise AssertionError(f"ssh as {user} neither logged in nor was refused: {result.stderr}")


def _logs_in(key, port, user) -> bool:
    return _answer(key, port, user=user).returncode == 0


def _boot_id(key, port) -> str:
    result = _answer(key, port, BOOT_ID)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.sqlite_pass_only
def test_ssh_access_follows_members_and_key_without_a_reset(
    course, alice, bob, carol, ines, qemu_host, debian_template, worker, group_keypair, tmp_path
):
    old_key, old_public = group_keypair
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Keepers", public_key=old_public, members=["bob"]
    )
    wait_operation(provision, timeout=180)
    vm.refresh_from_db()
    port = vm.ssh_port
    wait_for_ssh(old_key, port)
    boot_id = _boot_id(old_key, port)
    assert _logs_in(old_key, port, "bob") and _logs_in(old_key, port, "alice")
    wait_operation(
        vm_operation_request(
            vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "before"}
        )
    )
    mark = Operation.objects.latest("pk").pk

    # Bob leaves: his account is disabled, the others still log in.
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    op = _last_sync(vm, mark)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    assert not _logs_in(old_key, port, "bob")
    assert _logs_in(old_key, port, "alice") and _logs_in(old_key, port, "student")

    # The key is replaced (bob may still hold the old one): it stops working everywhere.
    new_key, new_public = keypair(tmp_path / "new_key")
    group_key_replace(group=vm.group, by=alice, ssh_public_key=new_public)
    op = _last_sync(vm, op.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    for user in ("student", "alice"):
        assert not _logs_in(old_key, port, user)
        assert _logs_in(new_key, port, user)

    # Carol joins: an account of her own, with the group's key and sudo, as the seed gives.
    membership_group_set(membership=carol.memberships.get(), group=vm.group, by=ines)
    op = _last_sync(vm, op.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    result = _answer(new_key, port, "sudo -n id -u", user="carol")
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr

    # A revert brings back the disk of before (bob, the old key): the update follows it.
    revert = vm_operation_request(
        vm=vm, kind=OperationKind.REVERT, by=alice, params={"name": "before"}
    )
    wait_operation(revert)
    op = _last_sync(vm, revert.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    wait_for_ssh(new_key, port)
    assert not _logs_in(old_key, port, "bob")
    assert not _logs_in(old_key, port, "student")
    assert _logs_in(new_key, port, "carol")

    assert _boot_id(new_key, port) == boot_id  # never reset nor rebooted
    vm.refresh_from_db()
    assert not vm.ssh_sync_due
    assert vm.ssh_accounts == ["student", "alice", "bob", "carol"]  # bob: to keep disabled
