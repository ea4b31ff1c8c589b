"""VM services: placement, quotas, operation requests, claiming and recovery.

The hypervisor side runs on libvirt's own test driver (a fresh driver per test).
"""

from decimal import Decimal

import pytest

from labs.choices import DesiredState, GroupStatus, ObservedState, OperationKind, OperationStatus
from labs.compute import placement, reconcile, requests, runner
from labs.errors import Busy, Invalid, OverQuota, Refused
from labs.models import Group, Host, Image, Operation, Snapshot, Vm, VmTemplate
from labs.people.groups import group_approve

pytestmark = pytest.mark.django_db


@pytest.fixture
def image(tmp_path):
    return Image.objects.create(
        name="deb", os="Debian 12", path=str(tmp_path / "base" / "base.qcow2"), size_gib=2
    )


@pytest.fixture
def template(course, image):
    return VmTemplate.objects.create(
        course=course,
        image=image,
        count=1,
        vcpus=1,
        memory_mib=1024,
        disk_gib=10,
        quota_vms=2,
        quota_vcpus=2,
        quota_memory_mib=2048,
        quota_disk_gib=20,
    )


def make_host(name, *, tmp_path, **over):
    fields = {
        "name": name,
        "uri": test_uri(tmp_path / name),
        "vcpus": 2,
        "memory_mib": 4096,
        "disk_gib": 50,
        "cpu_overcommit": Decimal(1),
        "memory_overcommit": Decimal(1),
        "disk_overcommit": Decimal(1),
        "virt_type": "qemu",
        "storage_dir": str(tmp_path / name / "vms"),
        "ssh_port_min": 30000,
        "ssh_port_max": 30009,
    }
    fields.update(over)
    return Host.objects.create(**fields)


def test_uri(folder):
    """A private libvirt test driver for one host (test:///<node xml>), holding the base
    image as a volume of a pool at <tmp>/base, where the image fixture says it is."""
    (folder / "vms").mkdir(parents=True, exist_ok=True)  # the test driver makes no dirs
    base_dir = folder.parent / "base"
    node = folder / "node.xml"
    node.write_text(
        "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>"
        "</cpu><memory>8388608</memory>"
        f"<pool type='dir'><name>base</name><target><path>{base_dir}</path></target>"
        "<volume type='file'><name>base.qcow2</name><capacity unit='GiB'>2</capacity>"
        f"<target><path>{base_dir}/base.qcow2</path><format type='qcow2'/></target>"
        "</volume></pool></node>"
    )
    return f"test://{node}"


test_uri.__test__ = False  # a helper, not a test


@pytest.fixture
def host(tmp_path):
    return make_host("h1", tmp_path=tmp_path)


def approve(group, by):
    group_approve(group=group, by=by)
    return list(Vm.objects.filter(group=group))


# --- placement ---------------------------------------------------------------------------


def test_approval_creates_the_template_vms_placed_with_a_port_and_a_queued_provision(
    group_a, ines, template, host
):
    [vm] = approve(group_a, ines)
    assert (vm.host, vm.ssh_port, vm.name) == (host, 30000, "vm1")
    assert (vm.vcpus, vm.memory_mib, vm.disk_gib) == (1, 1024, 10)
    op = vm.operations.get()
    assert (op.kind, op.status, op.requested_by) == ("provision", "queued", ines)


def test_without_a_template_approval_creates_no_vms(group_a, ines, host):
    assert approve(group_a, ines) == []
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.APPROVED


def test_without_capacity_the_vm_waits_queued_and_says_why(group_a, ines, template, tmp_path):
    make_host("small", tmp_path=tmp_path, memory_mib=512)
    [vm] = approve(group_a, ines)
    assert vm.host is None
    assert "no host has room" in vm.status_message
    assert vm.operations.get().status == OperationStatus.QUEUED
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.APPROVED


def test_disabled_hosts_get_nothing(group_a, ines, template, tmp_path):
    make_host("off", tmp_path=tmp_path, enabled=False)
    [vm] = approve(group_a, ines)
    assert vm.host is None and vm.status_message == "Waiting: no host is up (off disabled)."


def test_waiting_vms_are_placed_when_room_appears(group_a, ines, template, tmp_path):
    host = make_host("small", tmp_path=tmp_path, memory_mib=512)
    [vm] = approve(group_a, ines)
    Host.objects.filter(pk=host.pk).update(memory_mib=4096)
    assert reconcile.vms_place_waiting() == 1
    vm.refresh_from_db()
    assert vm.host == host and vm.ssh_port == 30000 and vm.status_message == ""


def test_overcommit_lets_more_vcpus_than_cores(group_a, group_b, ines, template, tmp_path):
    make_host("h", tmp_path=tmp_path, vcpus=1, cpu_overcommit=Decimal(2))
    [a] = approve(group_a, ines)
    [b] = approve(group_b, ines)
    assert a.host and b.host
    assert placement.host_usage(host=a.host).vcpus == (2, 2)


def test_placement_picks_the_host_with_most_free_memory(group_a, ines, template, tmp_path):
    make_host("a", tmp_path=tmp_path, memory_mib=2048)
    roomy = make_host("b", tmp_path=tmp_path, memory_mib=8192)
    [vm] = approve(group_a, ines)
    assert vm.host == roomy


def test_ssh_ports_are_unique_per_host_and_run_out_cleanly(
    course, make_student, make_public_key, ines, template, tmp_path
):
    from labs.people.groups import group_register

    make_host(
        "tiny",
        tmp_path=tmp_path,
        ssh_port_min=30000,
        ssh_port_max=30001,
        memory_mib=100000,
        vcpus=100,
        disk_gib=1000,
    )
    ports = []
    for n in range(3):
        student = make_student(f"s{n}")
        group = group_register(
            course=course,
            by=student,
            name=f"G{n}",
            member_usernames=[],
            project_title="t",
            project_idea="i",
            ssh_public_key=make_public_key(),
        )
        [vm] = approve(group, ines)
        ports.append(vm.ssh_port)
    assert ports == [30000, 30001, None]


# --- quotas ------------------------------------------------------------------------------


def test_members_add_vms_within_quota_and_are_told_when_over(group_a, alice, ines, template, host):
    approve(group_a, ines)
    vm2 = requests.vm_create(group=group_a, by=alice)
    assert vm2.name == "vm2"
    with pytest.raises(OverQuota, match="Over your group's quota for VMs"):
        requests.vm_create(group=group_a, by=alice)


def test_an_instructor_raises_a_groups_quota(group_a, alice, ines, template, host):
    approve(group_a, ines)
    requests.vm_create(group=group_a, by=alice)
    Group.objects.filter(pk=group_a.pk).update(
        quota_vms=3, quota_vcpus=3, quota_memory_mib=3072, quota_disk_gib=30
    )
    assert requests.vm_create(group=group_a, by=alice).name == "vm3"


def test_pending_groups_cannot_add_vms(group_a, alice, template, host):
    with pytest.raises(Refused, match="approved"):
        requests.vm_create(group=group_a, by=alice)


# --- requests ----------------------------------------------------------------------------


@pytest.fixture
def running_vm(group_a, ines, template, host):
    [vm] = approve(group_a, ines)
    Operation.objects.filter(vm=vm).update(status=OperationStatus.SUCCEEDED)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.RUNNING)
    vm.refresh_from_db()
    return vm


def test_a_second_operation_on_a_busy_vm_is_refused_clearly(running_vm, alice, bob):
    requests.vm_operation_request(vm=running_vm, kind=OperationKind.REBOOT, by=alice)
    with pytest.raises(Busy, match="vm1 is busy \\(reboot in progress\\)"):
        requests.vm_operation_request(vm=running_vm, kind=OperationKind.STOP, by=bob)
    assert running_vm.operations.filter(status="queued").count() == 1


def test_the_database_itself_refuses_two_active_operations(running_vm):
    from django.db import IntegrityError, transaction

    Operation.objects.create(vm=running_vm, kind="reboot")
    with pytest.raises(IntegrityError), transaction.atomic():
        Operation.objects.create(vm=running_vm, kind="stop", status="running")


def test_operations_that_make_no_sense_now_are_refused(running_vm, alice):
    with pytest.raises(Refused, match="already running"):
        requests.vm_operation_request(vm=running_vm, kind=OperationKind.START, by=alice)
    with pytest.raises(Refused, match="no snapshot named"):
        requests.vm_operation_request(
            vm=running_vm, kind=OperationKind.REVERT, by=alice, params={"name": "nope"}
        )
    with pytest.raises(Invalid, match="Unknown operation"):
        requests.vm_operation_request(vm=running_vm, kind=OperationKind.PROVISION, by=alice)


def test_snapshot_names_are_checked_and_a_running_vm_keeps_its_memory(running_vm, alice):
    with pytest.raises(Invalid, match="letters, digits"):
        requests.vm_operation_request(
            vm=running_vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "<b>"}
        )
    op = requests.vm_operation_request(
        vm=running_vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "before-lab2"}
    )
    assert op.params == {"name": "before-lab2", "with_memory": True}


def test_a_stopped_vm_gets_a_disk_only_snapshot_with_a_default_name(running_vm, alice):
    Vm.objects.filter(pk=running_vm.pk).update(observed_state=ObservedState.SHUTOFF)
    op = requests.vm_operation_request(vm=running_vm, kind=OperationKind.SNAPSHOT, by=alice)
    assert op.params["with_memory"] is False and op.params["name"].startswith("snap-")


# --- claiming and recovery ---------------------------------------------------------------


def test_only_one_worker_claims_an_operation(running_vm, alice):
    op = requests.vm_operation_request(vm=running_vm, kind=OperationKind.REBOOT, by=alice)
    first = runner.operation_claim(operation_id=op.pk, worker="w1/a")
    second = runner.operation_claim(operation_id=op.pk, worker="w2/b")
    assert first is not None and second is None
    op.refresh_from_db()
    assert (op.status, op.worker, op.attempts) == ("running", "w1/a", 1)


def test_a_restarted_worker_requeues_only_what_its_dead_self_held(running_vm, group_b, alice):
    op = requests.vm_operation_request(vm=running_vm, kind=OperationKind.REBOOT, by=alice)
    runner.operation_claim(operation_id=op.pk, worker="node1@h/dead")
    assert runner.operations_recover(worker_prefix="node2@h/", alive_worker="node2@h/new") == []
    assert runner.operations_recover(worker_prefix="node1@h/", alive_worker="node1@h/dead") == []
    assert runner.operations_recover(worker_prefix="node1@h/", alive_worker="node1@h/new") == [
        op.pk
    ]
    op.refresh_from_db()
    assert op.status == OperationStatus.QUEUED


# --- running on libvirt's test driver -------------------------------------------------------


def run(op):
    outcome = runner.operation_run(operation_id=op.pk, worker="t/1", may_retry=True)
    op.refresh_from_db()
    return outcome


def test_provision_then_operations_run_on_the_test_driver(group_a, alice, ines, template, host):
    [vm] = approve(group_a, ines)
    provision = vm.operations.get()
    assert run(provision).status == "succeeded", provision.error
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING

    snap = requests.vm_operation_request(
        vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s1"}
    )
    assert run(snap).status == "succeeded", snap.error
    assert Snapshot.objects.filter(vm=vm, name="s1", with_memory=True).exists()

    stop = requests.vm_operation_request(vm=vm, kind=OperationKind.FORCE_OFF, by=alice)
    assert run(stop).status == "succeeded", stop.error
    vm.refresh_from_db()
    assert (vm.observed_state, vm.desired_state) == ("shutoff", DesiredState.STOPPED)

    delete = requests.vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice)
    assert run(delete).status == "succeeded", delete.error
    vm.refresh_from_db()
    assert vm.observed_state == "deleted" and vm.ssh_port is None
    assert not Snapshot.objects.filter(vm=vm).exists()


def test_an_unreachable_host_requeues_for_retry_then_fails_with_a_message(
    group_a, ines, template, host
):
    Host.objects.filter(pk=host.pk).update(uri="qemu+tcp://127.0.0.1:1/system")
    [vm] = approve(group_a, ines)
    op = vm.operations.get()
    assert run(op).status == "retry"
    assert op.status == OperationStatus.QUEUED and "did not answer" in op.error
    outcome = runner.operation_run(operation_id=op.pk, worker="t/1", may_retry=False)
    op.refresh_from_db()
    assert outcome.status == "failed" and op.status == OperationStatus.FAILED
    assert "gave up after 2 tries" in op.error


def test_a_failure_names_the_host_to_members_not_its_libvirt_uri(group_a, ines, template, host):
    Host.objects.filter(pk=host.pk).update(uri="nosuchdriver:///system")
    [vm] = approve(group_a, ines)
    op = vm.operations.get()
    assert run(op).status == "retry"  # libvirt: "no connection driver available for <uri>"
    runner.operation_run(operation_id=op.pk, worker="t/1", may_retry=False)
    op.refresh_from_db()
    assert op.status == OperationStatus.FAILED
    assert f"host {host.name}" in op.error and "nosuchdriver" not in op.error


def test_a_missing_base_image_fails_permanently_with_its_path(group_a, ines, template, host):
    Image.objects.update(path="/nonexistent/base.qcow2")
    [vm] = approve(group_a, ines)
    op = vm.operations.get()
    assert run(op).status == "failed"
    assert "/nonexistent/base.qcow2" in op.error


def test_reconcile_marks_an_unreachable_hosts_vms_unknown_and_keeps_them(running_vm, host):
    Host.objects.filter(pk=host.pk).update(uri="qemu+tcp://127.0.0.1:1/system")
    host.refresh_from_db()
    report = reconcile.host_reconcile(host=host)
    running_vm.refresh_from_db()
    assert not report.reachable
    assert running_vm.observed_state == ObservedState.UNKNOWN
    assert Vm.objects.filter(pk=running_vm.pk).exists()


def test_reconcile_finds_a_vanished_domain_missing_and_restarts_a_stopped_one(
    group_a, alice, ines, template, host
):
    [vm] = approve(group_a, ines)
    run(vm.operations.get())
    # The guest powered itself off: reconcile starts it again (desired: running).
    from labs.drivers.registry import driver_for

    hv = driver_for(host)
    hv.force_off(vm.domain_name)
    report = reconcile.host_reconcile(host=host)
    assert report.restarted == 1 and any("shutoff" in line for line in report.drift)
    restart = vm.operations.get(kind=OperationKind.START)
    assert restart.requested_by is None
    assert run(restart).status == "succeeded"
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING


def test_members_of_a_group_rejected_after_approval_cannot_operate_its_vms(
    running_vm, group_a, alice, ines
):
    from labs.people.groups import group_reject

    group_reject(group=group_a, by=ines, note="Plagiarised proposal.")
    with pytest.raises(Refused, match="not approved"):
        requests.vm_operation_request(vm=running_vm, kind=OperationKind.STOP, by=alice)
    op = requests.vm_operation_request(vm=running_vm, kind=OperationKind.STOP, by=ines)
    assert op.requested_by == ines
