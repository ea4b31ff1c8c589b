"""The whole life of a real VM, through the services, a real Celery worker and QEMU."""

import subprocess

import pytest

from labs.choices import ObservedState, OperationKind
from labs.models import Snapshot
from labs.services.vms import vm_operation_request

from .conftest import approve_new_group, sha256, ssh, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True
    )


def test_approve_ssh_snapshot_revert_reset_delete(
    course,
    alice,
    bob,
    ines,
    qemu_host,
    debian_template,
    worker,
    group_keypair,
    base_image,
    storage_dir,
):
    key, public = group_keypair
    checksum_before = sha256(base_image)
    # Approval creates the VM and a provision operation that a worker runs.
    vm, provision = approve_new_group(
        course,
        by=alice,
        reviewer=ines,
        name="Kernel <Hackers> & 'co'",
        public_key=public,
        members=["bob"],
    )
    wait_operation(provision, timeout=120)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING
    assert vm.host == qemu_host and vm.ssh_port == 24200
    assert virsh("domstate", vm.domain_name).stdout.strip() == "running"

    # The group's key logs in over the forwarded port; cloud-init set the hostname.
    hostname = wait_for_ssh(key, vm.ssh_port)
    assert hostname == "kernel-hackers-co-vm1"
    assert ssh(key, vm.ssh_port, "echo before > marker && sync").returncode == 0

    # Snapshot with memory, change the file, revert: the file is as it was.
    snap = vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=bob, params={"name": "s1"})
    wait_operation(snap)
    assert Snapshot.objects.get(vm=vm, name="s1").with_memory
    assert ssh(key, vm.ssh_port, "echo after > marker && sync").returncode == 0
    assert ssh(key, vm.ssh_port, "cat marker").stdout.strip() == "after"
    wait_operation(
        vm_operation_request(vm=vm, kind=OperationKind.REVERT, by=alice, params={"name": "s1"})
    )
    wait_for_ssh(key, vm.ssh_port, timeout=60)
    assert ssh(key, vm.ssh_port, "cat marker").stdout.strip() == "before"

    # Reset to baseline: a fresh disk (the marker is gone), same port, snapshots gone.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.RESET, by=alice), timeout=180)
    vm.refresh_from_db()
    assert vm.ssh_port == 24200 and not vm.snapshots.exists()
    wait_for_ssh(key, vm.ssh_port)
    assert ssh(key, vm.ssh_port, "test -e marker; echo $?").stdout.strip() == "1"

    # Delete: no domain, overlay, seed or snapshot is left; the base image is untouched.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.DELETED
    assert virsh("dominfo", vm.domain_name).returncode != 0
    assert list(storage_dir.glob(f"{vm.domain_name}*")) == []
    assert not Snapshot.objects.filter(vm=vm).exists()
    assert sha256(base_image) == checksum_before
