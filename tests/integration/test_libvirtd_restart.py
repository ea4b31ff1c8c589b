"""libvirtd restarted in the middle of an operation: the operation still ends, once.

On one booted guest a snapshot, a stop and a reset each pause at a step after which the
worker talks to libvirt again; while it waits there, the machine's libvirtd is restarted
(``scripts/restart-libvirtd.sh``). The worker's connection is dead when it goes on: a
fresh lookup reconnects, and a call on an object of the old connection fails as "host …
did not answer", so the operation goes back to *queued* and its retry finishes the work.
The guest itself lives through the restart (QEMU does not depend on libvirtd). Afterwards
the row and libvirt agree, as after a worker crash.
"""

import subprocess

import pytest

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute.requests import vm_operation_request

from .conftest import ROOT, approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation
from .test_worker_crash import assert_row_and_host_agree

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PAUSE_SECONDS = 6  # long enough for a restart (about a second here); paid again on retry
# Where each kind pauses: the worker's next step is a libvirt call on its open connection.
RESTART_POINTS = [
    # before the snapshot is asked of libvirt
    (OperationKind.SNAPSHOT, {"name": "around-restart"}, "taking the snapshot"),
    # the guest was asked to power off; the worker goes on polling the domain's state
    (OperationKind.STOP, None, "waiting for the guest to power off"),
    # the new disk and domain are defined; starting it is next
    (OperationKind.RESET, None, "starting VM"),
]
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def libvirtd_restart() -> None:
    subprocess.run([str(ROOT / "scripts" / "restart-libvirtd.sh")], check=True, timeout=60)


@pytest.mark.sqlite_pass_only
def test_libvirtd_restarted_mid_operation_the_operation_ends_once(
    course, alice, ines, qemu_host, debian_template, worker, group_keypair, storage_dir
):
    key, public = group_keypair
    worker.stop()
    worker.start(
        STRATUS_FAILPOINTS=",".join(
            f"{kind}:{step}:{PAUSE_SECONDS}" for kind, _, step in RESTART_POINTS
        )
    )
    vm, provision = approve_new_group(course, by=alice, reviewer=ines, name="L", public_key=public)
    wait_operation(provision, timeout=180)
    vm.refresh_from_db()
    wait_for_ssh(key, vm.ssh_port)
    boot_id = ssh(key, vm.ssh_port, BOOT_ID).stdout.strip()

    attempts = {}
    for kind, params, step in RESTART_POINTS:
        op = vm_operation_request(vm=vm, kind=kind, by=alice, params=params)

        def paused(op=op, step=step):
            op.refresh_from_db()
            return op.status == OperationStatus.RUNNING and op.progress == step

        wait_for(paused, timeout=120, interval=0.2, what=f"the {kind} to reach “{step}”")
        libvirtd_restart()
        wait_operation(op, timeout=240)
        # A step that looks the domain up again gets a new connection at once (the old
        # one's close was seen); one still holding the old connection's domain fails as
        # "did not answer" and the retry does it. Either way: once, nothing doubled.
        assert op.attempts in (1, 2), f"{kind} ran {op.attempts} times"
        attempts[kind] = op.attempts
        assert_row_and_host_agree(vm, storage_dir)
        if kind == OperationKind.SNAPSHOT:
            # The guest ran on through the restart: the same boot, still answering. (A
            # snapshot with memory pauses the guest while it saves; on a loaded machine
            # its first SSH connection after that may be refused, so it gets a minute.)
            wait_for_ssh(key, vm.ssh_port, timeout=60)
            said = ssh(key, vm.ssh_port, BOOT_ID)
            assert said.stdout.strip() == boot_id, said.stderr
            assert vm.observed_state == ObservedState.RUNNING
            assert list(vm.snapshots.values_list("name", flat=True)) == ["around-restart"]
        elif kind == OperationKind.STOP:
            assert vm.observed_state == ObservedState.SHUTOFF
    # The reset booted the new disk (its snapshots gone with the old one).
    assert vm.observed_state == ObservedState.RUNNING and not vm.snapshots.exists()
    wait_for_ssh(key, vm.ssh_port)
    print(f"\nattempts after a libvirtd restart: {attempts}")

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
