"""The deadline and the end of term on a real guest (labs/compute/term.py).

One guest: a file written in it over SSH; the deadline's final snapshot of it running
(with memory), then, stopped, a second deadline's final snapshot (disk only); the end of
term archives it (a standalone compressed qcow2 and its manifest, the domain and its disk
gone, the VM row deleted); restore_archive brings it back on the same host, it boots from
the archived disk and the file is there. Two boots in all.
"""

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from labs.choices import DesiredState, OperationKind, OperationStatus
from labs.compute import term
from labs.compute.requests import vm_operation_request
from labs.drivers.qcow2 import file_sha256, standalone_check
from labs.errors import Refused
from labs.models import Course, Operation, Snapshot, Vm, VmArchive
from tests.conftest import child_db_env

from .conftest import Worker, approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROOF = "written before the deadline"


def _seconds(op: Operation) -> float:
    op.refresh_from_db()
    return (op.finished_at - op.started_at).total_seconds()


def _tick_until(predicate, what: str, timeout: float = 60):
    def ticked():
        term.term_tick()
        return predicate()

    return wait_for(ticked, timeout=timeout, interval=1, what=what)


def _libvirt_has(name: str) -> bool:
    result = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True
    )
    return result.returncode == 0


@pytest.mark.sqlite_pass_only
def test_the_deadline_and_the_end_of_term_on_a_real_guest(
    course, alice, ines, qemu_host, debian_template, group_keypair, tmp_path
):
    archive_dir = tmp_path / "archive"
    worker = Worker(connection.settings_dict["NAME"], child_db_env())
    worker.start(STRATUS_ARCHIVE_DIR=str(archive_dir))
    try:
        _walk_through(course, alice, ines, qemu_host, group_keypair, archive_dir)
    finally:
        worker.stop()


def _walk_through(course, alice, ines, qemu_host, group_keypair, archive_dir):
    key, public = group_keypair
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Keepers", public_key=public
    )
    wait_operation(provision, timeout=240)
    vm.refresh_from_db()
    wait_for_ssh(key, vm.ssh_port)
    wrote = ssh(key, vm.ssh_port, f"echo '{PROOF}' > proof.txt && sync", timeout=60)
    assert wrote.returncode == 0, wrote.stderr

    # The deadline passes: a final snapshot of the running VM, with its memory.
    Course.objects.filter(pk=course.pk).update(deadline_at=timezone.now() - timedelta(minutes=1))
    assert term.term_tick() == 1
    asked = Operation.objects.get(vm=vm, kind=OperationKind.SNAPSHOT, params__clock="deadline")
    wait_operation(asked, timeout=120)
    running_snapshot = _seconds(asked)
    final = Snapshot.objects.get(vm=vm, final=True)
    assert final.with_memory and final.name.startswith("final-")
    _tick_until(
        lambda: Course.objects.get(pk=course.pk).deadline_done_at, "the deadline to be done"
    )
    with pytest.raises(Refused, match="deadline has passed"):
        vm_operation_request(vm=vm, kind=OperationKind.RESET, by=alice)
    with pytest.raises(Refused, match="final snapshot"):
        vm_operation_request(
            vm=vm, kind=OperationKind.SNAPSHOT_DELETE, by=alice, params={"name": final.name}
        )

    # Stopped, a second deadline (another day) takes a disk-only final snapshot.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=120)
    Snapshot.objects.filter(pk=final.pk).update(final=False)
    Course.objects.filter(pk=course.pk).update(
        deadline_at=timezone.now() - timedelta(days=2), deadline_done_at=None
    )
    term.term_tick()
    stopped_op = Operation.objects.filter(
        vm=vm, kind=OperationKind.SNAPSHOT, params__clock="deadline"
    ).latest("pk")
    assert stopped_op.pk != asked.pk
    wait_operation(stopped_op, timeout=120)
    stopped_snapshot = _seconds(stopped_op)
    disk_only = Snapshot.objects.get(vm=vm, final=True)
    assert not disk_only.with_memory

    # The end of term: the VM is archived and removed.
    Course.objects.filter(pk=course.pk).update(term_ends_at=timezone.now() - timedelta(minutes=1))
    term.term_tick()
    archive_op = Operation.objects.get(vm=vm, kind=OperationKind.ARCHIVE)
    wait_operation(archive_op, timeout=900)
    archive_seconds = _seconds(archive_op)
    archive = VmArchive.objects.get(vm=vm)
    path = archive_dir / course.slug / "keepers-vm1.qcow2"
    assert archive.path == str(path) and path.is_file()
    assert file_sha256(str(path)) == archive.sha256 and path.stat().st_size == archive.size_bytes
    standalone_check(str(path))  # no backing file: it needs no base image
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["sha256"] == archive.sha256
    assert manifest["group"]["name"] == "Keepers" and manifest["vm"]["name"] == "vm1"
    assert [m["username"] for m in manifest["members"]] == ["alice"]
    assert {s["name"] for s in manifest["snapshots"]} == {final.name, disk_only.name}
    vm.refresh_from_db()
    assert vm.desired_state == DesiredState.DELETED
    assert not _libvirt_has(vm.domain_name)
    assert not (Path(qemu_host.storage_dir) / f"{vm.domain_name}.qcow2").exists()
    _tick_until(lambda: Course.objects.get(pk=course.pk).archived_at, "the course archived")

    # restore_archive: the same VM, the archived disk, the file still there.
    started = time.monotonic()
    call_command("restore_archive", str(archive.pk))
    vm = Vm.objects.get(pk=vm.pk)
    assert vm.desired_state == DesiredState.RUNNING and _libvirt_has(vm.domain_name)
    wait_for_ssh(key, vm.ssh_port)
    restore_to_ssh = time.monotonic() - started
    read = ssh(key, vm.ssh_port, "cat proof.txt", timeout=60)
    assert read.returncode == 0 and read.stdout.strip() == PROOF, read.stderr
    assert VmArchive.objects.get(pk=archive.pk).restored_at is not None
    assert not Operation.objects.filter(status=OperationStatus.FAILED).exists()
    print(
        f"\nfinal snapshot running (with memory): {running_snapshot:.2f} s; "
        f"stopped (disk only): {stopped_snapshot:.2f} s\n"
        f"archive: {archive.size_bytes / 2**20:.1f} MiB in {archive_seconds:.1f} s "
        f"(shut down, flatten + compress, delete)\n"
        f"restore to SSH: {restore_to_ssh:.1f} s"
    )
