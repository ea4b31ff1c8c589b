"""The whole life of a real VM, through the services, a real Celery worker and QEMU."""

import queue
import subprocess
import threading
import time

import pytest

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute.requests import vm_operation_request
from labs.models import Operation, Snapshot

from .conftest import (
    SSH_PORT_MIN,
    approve_new_group,
    sha256,
    ssh,
    wait_for_ssh,
    wait_operation,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True
    )


class TickingSession:
    """One SSH session whose shell prints its PID, then a counter every 0.2 s."""

    def __init__(self, key, port: int):
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.proc = subprocess.Popen(
            [
                "ssh",
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
                "echo pid $$; i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))

    def next(self, timeout: float) -> tuple[float, str]:
        return self.lines.get(timeout=timeout)

    def drain(self) -> list[tuple[float, str]]:
        seen = []
        while not self.lines.empty():
            seen.append(self.lines.get_nowait())
        return seen

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def suspend_and_resume(vm, key, *, by_suspend, by_resume) -> None:
    """Suspend: the session stalls (no tick for seconds) but lives; resume: the same
    session's counter goes on from where it stopped."""
    session = TickingSession(key, vm.ssh_port)
    try:
        pid = session.next(timeout=20)[1]
        assert pid.startswith("pid ")
        session.next(timeout=10)  # ticking
        wait_operation(vm_operation_request(vm=vm, kind=OperationKind.SUSPEND, by=by_suspend))
        vm.refresh_from_db()
        assert vm.observed_state == ObservedState.PAUSED
        assert virsh("domstate", vm.domain_name).stdout.strip() == "paused"
        time.sleep(0.5)  # a tick already on its way may still arrive
        last = int(session.drain()[-1][1]) if not session.lines.empty() else None
        stalled_at = time.monotonic()
        time.sleep(3)
        assert session.drain() == [], "the guest ticked while suspended"
        assert session.proc.poll() is None, "the SSH session ended while suspended"

        wait_operation(vm_operation_request(vm=vm, kind=OperationKind.RESUME, by=by_resume))
        vm.refresh_from_db()
        assert vm.observed_state == ObservedState.RUNNING
        resumed_at, tick = session.next(timeout=15)
        assert resumed_at - stalled_at >= 3
        if last is not None:
            assert int(tick) == last + 1, "the counter restarted: not the same session"
        assert session.proc.poll() is None
        assert ssh(key, vm.ssh_port, f"kill -0 {pid.split()[1]}").returncode == 0
    finally:
        session.close()
    trail = list(
        Operation.objects.filter(vm=vm, kind__in=[OperationKind.SUSPEND, OperationKind.RESUME])
        .order_by("created_at")
        .values_list("kind", "requested_by", "status")
    )
    assert trail == [
        (OperationKind.SUSPEND, by_suspend.pk, OperationStatus.SUCCEEDED),
        (OperationKind.RESUME, by_resume.pk, OperationStatus.SUCCEEDED),
    ]


@pytest.mark.sqlite_pass_only  # its rows are the unit suite's, which runs on PostgreSQL
def test_approve_ssh_suspend_resume_snapshot_revert_reset_delete(
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
    assert vm.host == qemu_host and vm.ssh_port == SSH_PORT_MIN
    assert virsh("domstate", vm.domain_name).stdout.strip() == "running"

    # The group's key logs in over the forwarded port; cloud-init set the hostname.
    hostname = wait_for_ssh(key, vm.ssh_port)
    assert hostname == "kernel-hackers-co-vm1"
    assert ssh(key, vm.ssh_port, "echo before > marker && sync").returncode == 0

    # Suspend (pause in RAM) and resume: an open SSH session stalls, then goes on.
    suspend_and_resume(vm, key, by_suspend=bob, by_resume=alice)

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
    assert vm.ssh_port == SSH_PORT_MIN and not vm.snapshots.exists()
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
