"""SIGKILL the worker in the middle of an operation: the operation still finishes, once.

A provision; then, on one booted guest, a snapshot, a revert, a stop and a reset, each
killed at a step where the host has done part of the work and the row does not say so yet.
After each the restarted worker re-runs it to the end, and the VM's row and libvirt agree.
"""

import pytest
from django.db import connection

from labs.choices import ACTIVE_OPERATION_STATUSES, ObservedState, OperationKind, OperationStatus
from labs.compute.requests import vm_operation_request
from labs.models import Operation

from .conftest import (
    PREFIX,
    Worker,
    _db_env,
    approve_new_group,
    wait_for,
    wait_for_ssh,
    wait_operation,
)
from .test_vm_lifecycle import virsh

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# The first worker pauses when the provision reports this step (the domain is defined, not
# yet started) and is killed there.
PAUSE_AT = "provision:starting VM"


def test_a_provision_killed_midway_finishes_once_after_the_worker_restarts(
    course, alice, ines, qemu_host, debian_template, worker, group_keypair, storage_dir
):
    _, public = group_keypair
    worker.stop()
    worker.start(STRATUS_FAILPOINTS=f"{PAUSE_AT}:60")
    vm, op = approve_new_group(course, by=alice, reviewer=ines, name="Crashers", public_key=public)

    def paused_midway():
        op.refresh_from_db()
        return op.status == OperationStatus.RUNNING and op.progress == PAUSE_AT.split(":", 1)[1]

    wait_for(paused_midway, timeout=60, what="the provision to reach its pause")
    worker.kill()
    op.refresh_from_db()
    assert op.status == OperationStatus.RUNNING  # left behind by the dead worker

    worker.start()  # no pause this time; it re-queues what the dead worker held
    wait_operation(op, timeout=120)
    assert op.attempts == 2

    uuids = virsh("list", "--all", "--uuid").stdout.split()
    assert uuids.count(str(vm.uuid)) == 1
    overlays = sorted(p.name for p in storage_dir.glob(f"{vm.domain_name}*.qcow2"))
    assert overlays == [f"{vm.domain_name}.qcow2"]
    assert not Operation.objects.filter(status=OperationStatus.RUNNING).exists()

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
    assert str(vm.uuid) not in virsh("list", "--all", "--uuid").stdout


# Where each long kind's first worker pauses to be killed: a step its executor or driver
# reports, after the host has done part of the work and before the row says so.
CRASH_POINTS = [
    # the snapshot exists on the host, its Snapshot row not yet
    (OperationKind.SNAPSHOT, {"name": "before-crash"}, "recording the snapshot"),
    # the domain is back at the snapshot, its state not read yet
    (OperationKind.REVERT, {"name": "before-crash"}, "reading the VM's state"),
    # the guest has been asked to power off and the worker waits for it
    (OperationKind.STOP, None, "waiting for the guest to power off"),
    # the old domain and disk are gone, the new ones defined, not started
    (OperationKind.RESET, None, "starting VM"),
]
LIBVIRT_STATES = {"running": ObservedState.RUNNING, "shut off": ObservedState.SHUTOFF}


def failpoint_for(index: int) -> str:
    """The pause of the ``index``-th crash point (none past the last)."""
    if index >= len(CRASH_POINTS):
        return ""
    kind, _, step = CRASH_POINTS[index]
    return f"{kind}:{step}:120"


def assert_row_and_host_agree(vm, storage_dir) -> None:
    """One domain, one overlay and one seed for the VM, nothing else in the storage
    directory, the same state and snapshots on both sides, no operation left running.
    (A revert is followed by an SSH-access update: the disk went back in time; it is
    waited for, and has to end too.)"""
    wait_for(
        lambda: not Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES).exists(),
        timeout=180,
        what="the operations that follow to end",
    )
    vm.refresh_from_db()
    assert virsh("list", "--all", "--uuid").stdout.split().count(str(vm.uuid)) == 1
    names = [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith(PREFIX)]
    assert names == [vm.domain_name]
    files = sorted(p.name for p in storage_dir.iterdir())
    assert files == [f"{vm.domain_name}-seed.iso", f"{vm.domain_name}.qcow2"]
    state = virsh("domstate", vm.domain_name).stdout.strip()
    assert LIBVIRT_STATES.get(state) == vm.observed_state, (state, vm.observed_state)
    on_host = sorted(virsh("snapshot-list", vm.domain_name, "--name").stdout.split())
    assert on_host == sorted(vm.snapshots.values_list("name", flat=True))
    assert not Operation.objects.filter(status=OperationStatus.RUNNING).exists()


@pytest.fixture
def crash_worker(transactional_db):
    """A worker of this run's host queue, not started yet (each start names its pauses)."""
    w = Worker(connection.settings_dict["NAME"], _db_env())
    yield w
    w.stop()


@pytest.mark.sqlite_pass_only
def test_each_long_operation_killed_midway_finishes_once_after_the_worker_restarts(
    course, alice, ines, qemu_host, debian_template, crash_worker, group_keypair, storage_dir
):
    key, public = group_keypair
    crash_worker.start(STRATUS_FAILPOINTS=failpoint_for(0))
    vm, provision = approve_new_group(course, by=alice, reviewer=ines, name="K", public_key=public)
    wait_operation(provision, timeout=120)
    wait_for_ssh(key, vm.ssh_port)  # booted: the stop below is a real guest power-off

    for index, (kind, params, step) in enumerate(CRASH_POINTS):
        op = vm_operation_request(vm=vm, kind=kind, by=alice, params=params)

        def paused_midway(op=op, step=step):
            op.refresh_from_db()
            return op.status == OperationStatus.RUNNING and op.progress == step

        wait_for(paused_midway, timeout=120, what=f"the {kind} to reach “{step}”")
        crash_worker.kill()
        op.refresh_from_db()
        assert op.status == OperationStatus.RUNNING  # left behind by the dead worker

        # The next worker re-runs it to the end (and pauses at the next kind's step).
        crash_worker.start(STRATUS_FAILPOINTS=failpoint_for(index + 1))
        wait_operation(op, timeout=180)
        assert op.attempts == 2, f"{kind} ran {op.attempts} times"
        assert_row_and_host_agree(vm, storage_dir)
        if kind == OperationKind.REVERT:
            assert vm.observed_state == ObservedState.RUNNING  # a memory snapshot: running
            wait_for_ssh(key, vm.ssh_port, timeout=60)  # the booted guest, as it was
        if kind == OperationKind.STOP:
            assert vm.observed_state == ObservedState.SHUTOFF
            assert "forced off" not in op.progress  # it powered off by itself
    assert vm.observed_state == ObservedState.RUNNING and not vm.snapshots.exists()  # reset

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
    assert list(storage_dir.glob(f"{vm.domain_name}*")) == []
