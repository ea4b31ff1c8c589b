"""An idle guest is suspended to disk by the course clock, and comes back as it was.

One booted guest: while a member holds an interactive SSH session (a pty, so utmp and the
guest agent's ``guest-get-users`` list them) the idle rule leaves it running even with its
idle time long past; once the session closes it is suspended to disk (managed save, "by
Course clock"); after Resume a file in /dev/shm and a background process (same PID) are
still there. The save and restore times are printed.
"""

import secrets
import subprocess
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from labs.choices import ObservedState, OperationKind
from labs.compute import idle
from labs.compute.requests import vm_operation_request
from labs.drivers.registry import driver_for
from labs.models import Course, Vm

from .conftest import _virsh, approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROOF = "/dev/shm/stratus-idle-proof"


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


@pytest.mark.sqlite_pass_only
def test_an_idle_guest_is_suspended_to_disk_only_when_nobody_is_logged_in_and_resumes_as_it_was(
    course, alice, ines, qemu_host, debian_template, worker, group_keypair
):
    # The CPU signal out of the way (a TCG guest just booted measured 63 % of its vCPU for
    # minutes): the login is the signal on trial here; CPU is the unit tests'.
    Course.objects.filter(pk=course.pk).update(idle_minutes=60, idle_cpu_percent=10000)
    key, public = group_keypair
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Sleepers", public_key=public
    )
    wait_operation(provision, timeout=180)
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
