"""The course clock on one real guest, from an idle evening to the end of term.

One guest, two boots (the restore's is the second):

- **idle**: while a member holds an interactive SSH session (a pty, so utmp and the guest
  agent's ``guest-get-users`` list them) the idle rule leaves it running, its idle time
  long past; once the session closes it is suspended to disk (managed save, "by Course
  clock"); after Resume a file in /dev/shm and a background process (same PID) are still
  there (labs/compute/idle.py);
- **the deadline**: a file written in it; the final snapshot of it running (with memory),
  then, stopped, a second deadline's final snapshot (disk only); students may no longer
  reset, nor delete the final snapshot (labs/compute/term.py);
- **the end of term**: it is archived (a standalone compressed qcow2 and its manifest, the
  domain and its disk gone, the VM row deleted); restore_archive brings it back on the
  same host, it boots from the archived disk and the file is there
  (labs/compute/archives.py).

The save, restore, snapshot and archive times are printed.
"""

import json
import secrets
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from labs.choices import DesiredState, ObservedState, OperationKind, OperationStatus
from labs.compute import idle, term
from labs.compute.requests import vm_operation_request
from labs.drivers.qcow2 import file_sha256, standalone_check
from labs.drivers.registry import driver_for
from labs.errors import Refused
from labs.models import Course, Operation, Snapshot, Vm, VmArchive
from tests.conftest import child_db_env

from .conftest import (
    Worker,
    _virsh,
    approve_new_group,
    ssh,
    wait_for,
    wait_for_ssh,
    wait_operation,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROOF = "/dev/shm/stratus-idle-proof"
KEPT = "written before the deadline"


def _interactive_session(key, port) -> subprocess.Popen:
    """An interactive login (``-tt``: a pty, so sshd writes utmp) that sleeps."""
    return subprocess.Popen(
        [
            "ssh",
            "-tt",
            "-i",
            str(key),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "student@127.0.0.1",
            "sleep 900",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _idle_long_ago(vm: Vm) -> None:
    Vm.objects.filter(pk=vm.pk).update(idle_since=timezone.now() - timedelta(hours=2))


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
def test_idle_suspend_to_disk_then_the_deadline_and_the_end_of_term_on_one_guest(
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
    # The CPU signal out of the way (a TCG guest just booted measured 63 % of its vCPU for
    # minutes): the login is the signal on trial here; CPU is the unit tests'.
    Course.objects.filter(pk=course.pk).update(idle_minutes=60, idle_cpu_percent=10000)
    key, public = group_keypair
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Keepers", public_key=public
    )
    wait_operation(provision, timeout=240)
    vm.refresh_from_db()
    port = vm.ssh_port
    wait_for_ssh(key, port)
    driver = driver_for(qemu_host)

    token = secrets.token_hex(8)
    result = ssh(
        key,
        port,
        f"echo {token} > {PROOF} && (setsid sleep 86400 </dev/null >/dev/null 2>&1 & echo $!)",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pid = result.stdout.strip()
    assert pid.isdigit(), result.stdout

    # Logged in interactively: in use, however long ago it was last seen idle.
    session = _interactive_session(key, port)
    try:
        wait_for(
            lambda: driver.guest_users(vm.domain_name) == ["student"],
            timeout=60,
            interval=1,
            what="the guest agent to list the SSH login",
        )
        assert idle.idle_tick() == []  # the first CPU sample
        time.sleep(10)  # past the login's own burst of CPU
        _idle_long_ago(vm)
        [seen] = idle.vms_observe([Vm.objects.get(pk=vm.pk)], now=timezone.now())
        assert seen.reason == "logged in: student"
        _idle_long_ago(vm)
        assert idle.idle_tick() == []
        vm.refresh_from_db()
        assert vm.idle_since is None and vm.observed_state == ObservedState.RUNNING
    finally:
        session.kill()
        session.wait(timeout=10)
    wait_for(
        lambda: driver.guest_users(vm.domain_name) == [],
        timeout=60,
        interval=1,
        what="the login to leave utmp",
    )

    # Nobody logged in, no console, an idle CPU: suspended to disk by the course clock.
    op = None
    for _ in range(5):  # a tick that saw a burst of CPU (the logout) clears idle_since
        time.sleep(3)
        _idle_long_ago(vm)
        asked = idle.idle_tick()
        if asked:
            [op] = asked
            break
    assert op is not None, "the idle rule never acted"
    op = wait_operation(op, timeout=180)
    assert (op.kind, op.requester) == (OperationKind.SAVE, "Course clock")
    saved_in = (op.finished_at - op.started_at).total_seconds()
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SAVED
    assert _virsh("domstate", vm.domain_name).stdout.strip() == "shut off"
    info = _virsh("dominfo", vm.domain_name).stdout
    assert any(
        line.split(":", 1)[0].strip() == "Managed save" and line.split(":", 1)[1].strip() == "yes"
        for line in info.splitlines()
    ), info
    assert idle.idle_tick() == []  # a saved VM is not looked at again

    # Resume: where it was.
    resume = wait_operation(
        vm_operation_request(vm=vm, kind=OperationKind.RESUME, by=alice), timeout=180
    )
    restored_in = (resume.finished_at - resume.started_at).total_seconds()
    wait_for_ssh(key, port)
    result = ssh(key, port, f"cat {PROOF}; cat /proc/{pid}/cmdline | tr '\\0' ' '", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [token, "sleep", "86400"]
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING and vm.idle_since is None
    print(f"\nidle save: managed save {saved_in:.1f} s, restore {restored_in:.1f} s (operations)")

    wrote = ssh(key, vm.ssh_port, f"echo '{KEPT}' > proof.txt && sync", timeout=60)
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
    assert read.returncode == 0 and read.stdout.strip() == KEPT, read.stderr
    assert VmArchive.objects.get(pk=archive.pk).restored_at is not None
    assert not Operation.objects.filter(status=OperationStatus.FAILED).exists()
    print(
        f"\nfinal snapshot running (with memory): {running_snapshot:.2f} s; "
        f"stopped (disk only): {stopped_snapshot:.2f} s\n"
        f"archive: {archive.size_bytes / 2**20:.1f} MiB in {archive_seconds:.1f} s "
        f"(shut down, flatten + compress, delete)\n"
        f"restore to SSH: {restore_to_ssh:.1f} s"
    )
