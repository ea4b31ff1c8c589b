"""SIGKILL the worker in the middle of a provision: the operation still finishes, once."""

import pytest

from labs.choices import OperationKind, OperationStatus
from labs.compute.requests import vm_operation_request
from labs.models import Operation

from .conftest import approve_new_group, wait_for, wait_operation
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
