"""Block volumes: the requests and their refusals, the disk quota, and the operations run
on libvirt's own test driver (a stopped VM: the test driver cannot hot-plug; the running
guest's side is tests/integration/test_one_guest.py)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import os
import xml.etree.ElementTree as ET

import pytest

from labs.choices import ObservedState, OperationKind, VolumeState
from labs.compute import executors, moves, quotas, requests, volumes
from labs.drivers.registry import driver_for
from labs.errors import Busy, Invalid, NotAllowed, OverQuota, Refused
from labs.models import Group, Host, Operation, Snapshot, Vm, Volume
from tests.compute.test_vms import (  # noqa: F401 - fixtures
    approve,
    host,
    image,
    make_host,
    run,
    template,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def vm(group_a, ines, template, host):
    """vm1 of group A, provisioned on the test driver, then forced off (stopped)."""
    [vm] = approve(group_a, ines)
    assert run(vm.operations.get()).status == "succeeded"
    vm.refresh_from_db()
    off = requests.vm_operation_request(vm=vm, kind=OperationKind.FORCE_OFF, by=ines)
    assert run(off).status == "succeeded", off.error
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    return vm


def definition(vm) -> ET.Element:
    dom = driver_for(vm.host)._conn.lookupByName(vm.domain_name)
    return ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - the test driver's own XML


def serials(vm) -> list[str]:
    return [d.findtext("serial") for d in definition(vm).iter("disk") if d.findtext("serial")]


def held(host) -> set[str]:
    """The volumes of the host's storage pool (the test driver keeps them as metadata)."""
    pool = driver_for(host)._pool_for(host.storage_dir, create=False)
    pool.refresh(0)
    return set(pool.listVolumes())


def create(vm, by, name="data", size=2):
    op = volumes.volume_create_request(vm=vm, name=name, size_gib=size, by=by)
    assert run(op).status == "succeeded", op.error
    return Volume.objects.get(pk=op.params["volume"]), op


def test_a_member_adds_a_volume_to_a_stopped_vm_and_its_definition_has_it_by_serial(
    vm, alice, host
):
    volume, op = create(vm, alice)
    assert (op.kind, op.requested_by, op.params["name"]) == ("volume_create", alice, "data")
    assert (volume.vm, volume.host, volume.state, volume.size_gib) == (vm, host, "ready", 2)
    assert serials(vm) == [volume.serial]
    disk = next(d for d in definition(vm).iter("disk") if d.findtext("serial"))
    assert disk.find("source").get("file") == os.path.join(host.storage_dir, volume.file_name)
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    assert set(op.params["timings"]) == {"create_s", "attach_s"}


def test_detach_takes_it_out_of_the_definition_and_it_stays_on_the_host(vm, alice):
    volume, _ = create(vm, alice)
    op = volumes.volume_detach_request(volume=volume, by=alice)
    assert run(op).status == "succeeded", op.error
    volume.refresh_from_db()
    assert volume.vm is None and serials(vm) == []
    assert volume.file_name in held(vm.host)


def test_a_detached_volume_is_attached_to_another_vm_of_the_group_on_its_host(
    vm, alice, bob, ines
):
    volume, _ = create(vm, alice)
    assert run(volumes.volume_detach_request(volume=volume, by=alice)).status == "succeeded"
    Group.objects.filter(pk=vm.group_id).update(quota_disk_gib=40)
    other = requests.vm_create(group=vm.group, by=bob)
    assert run(other.operations.get()).status == "succeeded"
    assert run(requests.vm_operation_request(vm=other, kind="force_off", by=ines)).status
    other.refresh_from_db()
    op = volumes.volume_attach_request(volume=volume, vm=other, by=bob)
    assert run(op).status == "succeeded", op.error
    volume.refresh_from_db()
    assert volume.vm == other and serials(other) == [volume.serial] and serials(vm) == []


def test_a_reset_makes_only_the_system_disk_again_and_keeps_the_volume_attached(vm, alice):
    volume, _ = create(vm, alice)
    before = held(vm.host)
    reset = requests.vm_operation_request(vm=vm, kind=OperationKind.RESET, by=alice)
    assert run(reset).status == "succeeded", reset.error
    assert serials(vm) == [volume.serial]
    assert volume.file_name in held(vm.host) and held(vm.host) == before
    volume.refresh_from_db()
    assert volume.vm == vm


def test_deleting_the_vm_detaches_its_volumes_and_keeps_them(vm, alice):
    volume, _ = create(vm, alice)
    delete = requests.vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice)
    assert run(delete).status == "succeeded", delete.error
    volume.refresh_from_db()
    assert volume.vm is None and volume.state == VolumeState.READY
    assert volume.file_name in held(vm.host)


def test_a_detached_volume_is_deleted_file_and_row_and_the_history_keeps_its_name(vm, alice):
    volume, _ = create(vm, alice)
    assert run(volumes.volume_detach_request(volume=volume, by=alice)).status == "succeeded"
    op = volumes.volume_delete_request(volume=volume, by=alice)
    assert (op.vm, op.kind) == (vm, OperationKind.VOLUME_DELETE)
    assert run(op).status == "succeeded", op.error
    assert not Volume.objects.filter(pk=volume.pk).exists()
    assert volume.file_name not in held(vm.host)
    assert Operation.objects.get(pk=op.pk).params["name"] == "data"


def test_a_volume_of_a_deleted_vm_is_deleted_on_its_host(vm, alice):
    volume, _ = create(vm, alice)
    assert run(requests.vm_operation_request(vm=vm, kind="delete", by=alice)).status
    op = volumes.volume_delete_request(volume=volume, by=alice)
    assert op.vm == vm  # the deleted VM's row names the host; its worker deletes it
    assert run(op).status == "succeeded", op.error
    assert not Volume.objects.exists()


def test_snapshots_record_the_volumes_attached_when_they_were_taken(vm, alice):
    volume, _ = create(vm, alice)
    snap = requests.vm_operation_request(vm=vm, kind="snapshot", by=alice, params={"name": "s1"})
    assert run(snap).status == "succeeded", snap.error
    held = Snapshot.objects.get(vm=vm, name="s1").volumes
    assert held == [{"id": volume.pk, "name": "data", "serial": volume.serial}]


def test_a_volume_in_a_snapshot_is_not_deleted_and_a_revert_without_it_is_refused(vm, alice):
    volume, _ = create(vm, alice)
    snap = requests.vm_operation_request(vm=vm, kind="snapshot", by=alice, params={"name": "s1"})
    assert run(snap).status == "succeeded"
    assert run(volumes.volume_detach_request(volume=volume, by=alice)).status == "succeeded"
    with pytest.raises(Refused, match="is in snapshot s1 of vm1: delete that snapshot first"):
        volumes.volume_delete_request(volume=volume, by=alice)
    revert = requests.vm_operation_request(vm=vm, kind="revert", by=alice, params={"name": "s1"})
    assert run(revert).status == "failed"
    assert "attach data again first" in revert.error
    assert serials(vm) == []  # nothing was put back


def test_the_disk_quota_counts_volumes_beside_the_vms_disks(vm, alice, template):
    # The template: 20 GiB of disk; vm1 has a 10 GiB system disk.
    assert quotas.group_usage(group=vm.group)["disk_gib"] == 10
    create(vm, alice, name="a", size=6)
    assert quotas.group_usage(group=vm.group)["disk_gib"] == 16
    with pytest.raises(OverQuota, match="Over your group's quota for disk"):
        volumes.volume_create_request(vm=vm, name="b", size_gib=5, by=alice)
    assert volumes.quota_left_gib(group=vm.group) == 4
    assert not Volume.objects.filter(name="b").exists()


@pytest.mark.parametrize(
    ("name", "size", "error", "message"),
    [
        ("Data!", 1, Invalid, "a-z, 0-9 and '-'"),
        ("-data", 1, Invalid, "a-z, 0-9 and '-'"),
        ("x" * 41, 1, Invalid, "up to 40"),
        ("data", 0, Invalid, "1 to 2048 GiB"),
        ("data", 4096, Invalid, "1 to 2048 GiB"),
    ],
)
def test_unusable_names_and_sizes_are_refused_saying_what_works(
    vm, alice, name, size, error, message
):
    with pytest.raises(error, match=message):
        volumes.volume_create_request(vm=vm, name=name, size_gib=size, by=alice)
    assert not Volume.objects.exists() and not Operation.objects.filter(kind="volume_create")


def test_a_second_volume_of_the_same_name_is_refused(vm, alice):
    create(vm, alice)
    with pytest.raises(Refused, match="already has a volume named “data”"):
        volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice)


def test_the_database_refuses_two_volumes_of_one_name_in_a_group(vm):
    from django.db import IntegrityError, transaction

    Volume.objects.create(group=vm.group, name="x", size_gib=1, host=vm.host)
    with pytest.raises(IntegrityError), transaction.atomic():
        Volume.objects.create(group=vm.group, name="x", size_gib=1, host=vm.host)
    with pytest.raises(IntegrityError), transaction.atomic():
        Volume.objects.create(group=vm.group, name="Bad name", size_gib=1, host=vm.host)
    with pytest.raises(IntegrityError), transaction.atomic():
        Volume.objects.create(group=vm.group, name="y", size_gib=0, host=vm.host)


def test_refusals_name_the_reason(vm, alice, carol, group_b, make_vm, tmp_path):
    volume, _ = create(vm, alice)
    with pytest.raises(Refused, match="attached to vm1: detach it first"):
        volumes.volume_delete_request(volume=volume, by=alice)
    with pytest.raises(Refused, match="attached to vm1: detach it first"):
        volumes.volume_attach_request(volume=volume, vm=vm, by=alice)
    # Another group's member: not allowed (the views answer 404 before this).
    with pytest.raises(NotAllowed):
        volumes.volume_detach_request(volume=volume, by=carol)
    other = make_vm(group_b, name="vm1", host=vm.host, ssh_port=30005)
    with pytest.raises(NotAllowed, match="only to a VM of its own group"):
        volumes.volume_attach_request(volume=volume, vm=other, by=alice)
    assert run(volumes.volume_detach_request(volume=volume, by=alice)).status == "succeeded"
    with pytest.raises(Refused, match="is not attached"):
        volumes.volume_detach_request(volume=volume, by=alice)
    # A VM of the group on another host: a volume stays on its host.
    far = make_host("h2", tmp_path=tmp_path, ssh_port_min=31000, ssh_port_max=31001)
    vm2 = Vm.objects.create(
        group=vm.group, name="vm2", host=far, image=vm.image, vcpus=1, memory_mib=512,
        disk_gib=1, observed_state=ObservedState.SHUTOFF,
    )  # fmt: skip
    with pytest.raises(Refused, match="is on host h1 and vm2 on h2"):
        volumes.volume_attach_request(volume=volume, vm=vm2, by=alice)


def test_a_vm_suspended_to_disk_or_busy_takes_no_volume(vm, alice):
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SAVED)
    with pytest.raises(Refused, match="vm1 is suspended to disk"):
        volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice)  # queued
    with pytest.raises(Busy, match="vm1 is busy"):
        volumes.volume_create_request(vm=vm, name="more", size_gib=1, by=alice)
    assert not Volume.objects.filter(name="more").exists()  # rolled back with the refusal


def test_a_volume_with_an_operation_queued_is_busy(vm, alice, bob):
    volume, _ = create(vm, alice)
    volumes.volume_detach_request(volume=volume, by=alice)  # queued, not run yet
    with pytest.raises(Busy, match=r"Volume data is busy \(detach volume on vm1\)"):
        volumes.volume_detach_request(volume=volume, by=bob)


def test_the_volume_kinds_are_in_the_catalogue_and_not_on_the_generic_endpoint(vm, alice):
    from labs.compute import kinds

    for kind in ("volume_create", "volume_attach", "volume_detach", "volume_delete"):
        assert kinds.CATALOGUE[kind].executor.__name__ == kind
        assert kinds.requestable(kind) is None  # asked for through labs.compute.volumes
        with pytest.raises(Invalid):
            requests.vm_operation_request(vm=vm, kind=kind, by=alice)
    assert not any(k.kind.startswith("volume") for k in kinds.on_vm_card(vm))


def test_a_running_vm_with_volumes_is_not_moved_live(vm, alice, ines, tmp_path, sent):
    create(vm, alice)
    to = make_host("h2", tmp_path=tmp_path, ssh_port_min=31000, ssh_port_max=31001)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.RUNNING)
    with pytest.raises(Refused, match="has block volumes, which a live move does not take"):
        moves.vm_move_request(vm=vm, to=to, by=ines)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    op = moves.vm_move_request(vm=vm, to=to, by=ines)
    assert op.params["live"] is False


def test_the_cold_move_plan_takes_the_volumes_with_the_same_serials(
    vm, alice, tmp_path, monkeypatch
):
    """The spec both hosts are given lists the volume (the copy and the domain on the
    destination come from it), and the move's executor records it on the destination and
    removes it from the source."""
    volume, _ = create(vm, alice)
    spec = executors.vm_spec(Vm.objects.get(pk=vm.pk))
    assert [(v.file_name, v.serial, v.size_gib) for v in spec.volumes] == [
        (volume.file_name, volume.serial, 2)
    ]

    class Fake:
        """Stands for both hosts' drivers: what the move asked of each."""

        def __init__(self, name):
            self.name, self.calls = name, []

        def resolve_virt_type(self, requested):
            return "qemu"

        def copy_offline(self, to, *, source, target, seed_iso, progress):
            self.calls.append(("copy", [v.serial for v in target.volumes], target.storage_dir))
            return {"total_s": 1.0}

        def delete(self, spec):
            self.calls.append(("delete", spec.name))

        def volume_delete(self, *, storage_dir, volume):
            self.calls.append(("volume_delete", volume.serial, storage_dir))

    to = make_host("h2", tmp_path=tmp_path, ssh_port_min=31000, ssh_port_max=31001)
    fakes = {vm.host.name: Fake("src"), to.name: Fake("dst")}
    op = Operation.objects.create(
        vm=vm,
        kind=OperationKind.MOVE,
        status="running",
        params={"host": to.pk, "from": vm.host_id, "ssh_port": 31000, "live": False},
    )
    monkeypatch.setattr(moves, "driver_for", lambda host: fakes[host.name])
    moves.move(Operation.objects.select_related("vm").get(pk=op.pk))
    src = fakes[vm.host.name].calls
    assert src[0] == ("copy", [volume.serial], to.storage_dir)
    assert ("volume_delete", volume.serial, vm.host.storage_dir) in src
    volume.refresh_from_db()
    assert volume.host == to and volume.vm_id == vm.pk
    assert Host.objects.get(pk=to.pk).volumes.get() == volume


def test_a_failed_deletion_shows_the_volume_being_deleted_and_may_be_asked_again(
    vm, alice, monkeypatch
):
    from labs.drivers.base import HypervisorError
    from labs.drivers.libvirt import LibvirtDriver

    volume, _ = create(vm, alice)
    assert run(volumes.volume_detach_request(volume=volume, by=alice)).status == "succeeded"
    real = LibvirtDriver.volume_delete

    def refuse(self, **kwargs):
        raise HypervisorError("deleting volume failed on host h1: device busy")

    monkeypatch.setattr(LibvirtDriver, "volume_delete", refuse)
    failed = volumes.volume_delete_request(volume=volume, by=alice)
    assert run(failed).status == "failed" and "device busy" in failed.error
    volume.refresh_from_db()
    assert volume.state == VolumeState.DELETING
    with pytest.raises(Refused, match="is being deleted"):
        volumes.volume_attach_request(volume=volume, vm=vm, by=alice)
    monkeypatch.setattr(LibvirtDriver, "volume_delete", real)
    assert run(volumes.volume_delete_request(volume=volume, by=alice)).status == "succeeded"
    assert not Volume.objects.exists() and volume.file_name not in held(vm.host)
