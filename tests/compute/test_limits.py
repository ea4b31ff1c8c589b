"""Abuse limits on what one group can ask of the hypervisors: snapshots per VM, the memory
snapshots keep on disk, operations per minute, and how long a shut-down may hold a worker."""

import pytest
from django.conf import settings as django_settings

from labs.choices import ObservedState, OperationKind
from labs.compute import dispatch, quotas
from labs.compute.requests import vm_operation_request
from labs.errors import OverQuota, Refused
from labs.models import Image, Operation, Snapshot, VmTemplate

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch):
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: "")


def test_a_vm_keeps_at_most_the_courses_snapshot_limit(alice, group_a, make_vm):
    group_a.course.snapshot_limit = 2
    group_a.course.save()
    vm = make_vm(group_a, observed_state=ObservedState.SHUTOFF)
    for name in ("s1", "s2"):
        Snapshot.objects.create(vm=vm, name=name, with_memory=False)
    with pytest.raises(OverQuota, match="vm1 has 2 snapshots, the most this course allows"):
        vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s3"})
    assert not Operation.objects.exists()
    Snapshot.objects.filter(name="s1").delete()
    vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s3"})


def test_snapshot_memory_counts_against_the_groups_disk_quota(alice, course, group_a, make_vm):
    vm = make_vm(group_a, memory_mib=2048, disk_gib=10)  # running: snapshots keep 2 GiB
    VmTemplate.objects.create(course=course, image=Image.objects.get(), quota_disk_gib=14)
    assert quotas.group_usage(group=group_a)["disk_gib"] == 10
    Snapshot.objects.create(vm=vm, name="s1", with_memory=True)
    assert quotas.group_usage(group=group_a)["disk_gib"] == 12
    Snapshot.objects.create(vm=vm, name="s2", with_memory=False)  # disk only: costs nothing
    assert quotas.group_usage(group=group_a)["disk_gib"] == 12
    vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s3"})
    Snapshot.objects.create(vm=vm, name="s3", with_memory=True)
    Operation.objects.all().delete()
    with pytest.raises(OverQuota, match="quota for disk"):
        vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s4"})


def test_a_group_asks_for_at_most_so_many_operations_a_minute(
    alice, ines, group_a, make_vm, settings
):
    settings.OPERATIONS_PER_GROUP_PER_MINUTE = 3
    vms = [make_vm(group_a, name=f"vm{n}") for n in range(1, 5)]
    for vm in vms[:3]:
        op = vm_operation_request(vm=vm, kind=OperationKind.REBOOT, by=alice)
        Operation.objects.filter(pk=op.pk).update(status="succeeded")
    with pytest.raises(Refused, match="asked for 3 operations in the last minute.*try again in"):
        vm_operation_request(vm=vms[3], kind=OperationKind.REBOOT, by=alice)
    # The course's staff (and Stratus itself) are not counted.
    vm_operation_request(vm=vms[3], kind=OperationKind.REBOOT, by=ines)


def test_the_default_shut_down_grace_is_seconds_not_minutes():
    assert django_settings.VM_SHUTDOWN_TIMEOUT <= 30
