"""Two hypervisors: a VM placed on the second host runs there, driven by that host's own
worker over the host's libvirt URI (qemu+tcp on 127.0.0.2 here: a second libvirtd in a
mount namespace of its own, scripts/second-libvirtd.sh), and leaves nothing there when
it is deleted; a stopped VM moved there (a cold move) comes with its disk and every
snapshot, and reverts there; a running one moved live keeps running, the same boot and
the same processes, behind the new host's SSH forward; a drain moves a host's VMs off and
lists the one that could not go, with the reason. A move survives the destination's
libvirtd killed midway; an open browser console follows a live move; registering a host
checks its console channel.
"""

import secrets
import subprocess
import time

import pytest

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    ObservedState,
    OperationKind,
    OperationStatus,
)
from labs.compute import volumes
from labs.compute.drain import host_drain
from labs.compute.moves import vm_move_request
from labs.compute.requests import vm_operation_request
from labs.drivers.cloudinit import hostname_for
from labs.errors import NotAllowed, Refused
from labs.models import Host, Operation, Volume
from labs.people.groups import group_approve, group_register

from .conftest import (
    PREFIX,
    approve_new_group,
    keypair,
    ssh,
    virsh_on,
    wait_for_ssh,
    wait_operation,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def _answer(key, port: int, command: str) -> str:
    """What ``command`` prints in the guest; a connection that failed is tried again."""
    for _ in range(5):
        result = ssh(key, port, command)
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(1)
    raise AssertionError(f"{command!r} failed in the guest: {result.stderr}")


def _provisioned_on_first(course, alice, ines, second_host, *, name, public_key):
    """A group's VM provisioned on the first host (the second takes none meanwhile)."""
    Host.objects.filter(pk=second_host.pk).update(enabled=False)
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name=name, public_key=public_key
    )
    wait_operation(provision, timeout=240)
    Host.objects.filter(pk=second_host.pk).update(enabled=True)
    vm.refresh_from_db()
    return vm


def _ssh_args(key, port: int) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3", "student@127.0.0.1",
    ]  # fmt: skip


def _signed_in(playwright, server, user, path: str):
    """Chromium signed in as ``user`` (a fresh password) on ``path``: (browser, page)."""
    from ..e2e.conftest import CHROMIUM, CHROMIUM_ARGS

    password = secrets.token_urlsafe(12)
    user.set_password(password)
    user.save()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/accounts/login/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    page.goto(server.url + path)
    return browser, page


def _domains(uri: str) -> list[str]:
    names = virsh_on(uri, "list", "--all", "--name").stdout.split()
    return [n for n in names if n.startswith(PREFIX)]


@pytest.mark.sqlite_pass_only
def test_a_vm_placed_on_the_second_host_runs_there_and_leaves_nothing(
    course,
    alice,
    ines,
    qemu_host,
    second_host,
    debian_template,
    worker,
    second_worker,
    group_keypair,
    second_storage_dir,
):
    key, public = group_keypair
    qemu_host.enabled = False  # the first host takes no new VMs: the second gets it
    qemu_host.save(update_fields=["enabled"])

    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Far", public_key=public
    )
    wait_operation(provision, timeout=240)
    vm.refresh_from_db()
    assert vm.host == second_host and provision.worker.startswith(second_host.name)
    assert second_host.ssh_port_min <= vm.ssh_port <= second_host.ssh_port_max
    assert _domains(second_host.uri) == [vm.domain_name]
    assert vm.domain_name not in _domains(qemu_host.uri)
    files = sorted(p.name for p in second_storage_dir.iterdir())
    assert files == [f"{vm.domain_name}-seed.iso", f"{vm.domain_name}.qcow2"]

    # The guest booted there, with the group's key, behind the second host's forward.
    wait_for_ssh(key, vm.ssh_port, timeout=240)
    assert ssh(key, vm.ssh_port, "hostname").stdout.strip() == hostname_for(f"Far-{vm.name}")

    snapshot = vm_operation_request(
        vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "far-away"}
    )
    wait_operation(snapshot, timeout=120)
    listed = virsh_on(second_host.uri, "snapshot-list", vm.domain_name, "--name").stdout.split()
    assert listed == ["far-away"]
    stop = wait_operation(
        vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=120
    )
    assert stop.worker.startswith(second_host.name)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    assert virsh_on(second_host.uri, "domstate", vm.domain_name).stdout.strip() == "shut off"

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice), timeout=120)
    assert _domains(second_host.uri) == []
    assert list(second_storage_dir.iterdir()) == []


@pytest.mark.sqlite_pass_only
def test_a_stopped_vm_moves_with_snapshots_and_volume_across_a_killed_libvirtd_and_reverts(
    course,
    alice,
    ines,
    qemu_host,
    second_host,
    debian_template,
    worker,
    second_worker,
    group_keypair,
    storage_dir,
    second_storage_dir,
):
    from .conftest import second_libvirtd_kill_and_start, wait_for

    key, public = group_keypair
    # The disk and its snapshots are on the destination; defining the VM there is next.
    step = f"defining VM on {second_host.name}"
    worker.stop()
    worker.start(STRATUS_FAILPOINTS=f"move:{step}:8")
    vm = _provisioned_on_first(course, alice, ines, second_host, name="Mover", public_key=public)
    assert vm.host == qemu_host
    old_port = vm.ssh_port
    wait_for_ssh(key, old_port, timeout=240)
    # A block volume with a file on it goes along (same serial), and bars a live move.
    op = wait_operation(volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice))
    volume = Volume.objects.get(pk=op.params["volume"])
    by_id = volume.guest_path
    wait_for(lambda: ssh(key, old_port, f"test -e {by_id}").returncode == 0, timeout=30)
    write = (
        f"sudo mkfs.ext4 -q -F {by_id} && sudo mkdir -p /mnt/d && sudo mount {by_id} /mnt/d "
        "&& echo moved-along | sudo tee /mnt/d/f && sync && sudo umount /mnt/d"
    )
    assert ssh(key, old_port, write, timeout=60).returncode == 0
    with pytest.raises(Refused, match="has block volumes"):
        vm_move_request(vm=vm, to=second_host, by=ines)
    for mark in ("one", "two"):
        assert ssh(key, old_port, f"echo {mark} > mark && sync").returncode == 0
        wait_operation(
            vm_operation_request(
                vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": mark}
            )
        )
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=120)

    # A student may not move it; the course's instructor may.
    with pytest.raises(NotAllowed):
        vm_move_request(vm=vm, to=second_host, by=alice)
    move = vm_move_request(vm=vm, to=second_host, by=ines)

    # Midway, the destination's libvirtd dies (SIGKILL) and is started again.
    def paused():
        move.refresh_from_db()
        return move.status == OperationStatus.RUNNING and move.progress == step

    wait_for(paused, timeout=120, interval=0.2, what=f"the move to reach “{step}”")
    second_libvirtd_kill_and_start(second_host.uri)
    wait_operation(move, timeout=300)

    # The call on the dead connection failed as "did not answer"; the retry started over
    # on a clean destination. The VM is there whole, nowhere else, every snapshot with it.
    assert move.attempts == 2, move.attempts
    assert not Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES).exists()
    vm.refresh_from_db()
    assert vm.host == second_host and vm.observed_state == ObservedState.SHUTOFF
    assert second_host.ssh_port_min <= vm.ssh_port <= second_host.ssh_port_max
    assert vm.status_message == f"Moved from {qemu_host.name} to {second_host.name}."
    assert _domains(second_host.uri) == [vm.domain_name]
    assert _domains(qemu_host.uri) == []
    assert not list(storage_dir.glob(f"{vm.domain_name}*"))
    volume.refresh_from_db()
    assert volume.host == second_host and volume.vm == vm
    assert sorted(p.name for p in second_storage_dir.iterdir()) == sorted(
        [f"{vm.domain_name}-seed.iso", f"{vm.domain_name}.qcow2", volume.file_name]
    )
    assert not (storage_dir / volume.file_name).exists()
    listed = virsh_on(second_host.uri, "snapshot-list", vm.domain_name, "--name").stdout.split()
    assert sorted(listed) == ["one", "two"]
    assert sorted(vm.snapshots.values_list("name", flat=True)) == ["one", "two"]
    timings = move.params["timings"]

    # Each snapshot reverts there, memory and all (the guest runs at once, no boot), behind
    # the new host's forward.
    for mark in ("two", "one"):
        wait_for(  # the SSH-access update that follows a revert, done first
            lambda: not vm.operations.filter(status__in=ACTIVE_OPERATION_STATUSES).exists(),
            timeout=180,
            what="the VM to be idle",
        )
        revert = vm_operation_request(
            vm=vm, kind=OperationKind.REVERT, by=alice, params={"name": mark}
        )
        wait_operation(revert, timeout=120)
        wait_for_ssh(key, vm.ssh_port, timeout=60)
        assert _answer(key, vm.ssh_port, "cat mark") == mark
    read = f"sudo mkdir -p /mnt/d && sudo mount {by_id} /mnt/d && cat /mnt/d/f"
    assert _answer(key, vm.ssh_port, read) == "moved-along"
    print(f"\ncold move across a killed libvirtd: {timings}, {move.attempts} attempts")

    # Deleting the VM keeps its volume (detached); the volume's deletion runs there.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice), timeout=120)
    assert _domains(second_host.uri) == []
    volume.refresh_from_db()
    assert volume.vm is None and (second_storage_dir / volume.file_name).exists()
    wait_operation(volumes.volume_delete_request(volume=volume, by=alice))
    assert not (second_storage_dir / volume.file_name).exists()


@pytest.mark.sqlite_pass_only
def test_a_running_vm_moves_live_under_its_open_console_and_its_processes_live_on(
    course,
    alice,
    ines,
    qemu_host,
    second_host,
    second_host_sshd,
    debian_template,
    worker,
    second_worker,
    group_keypair,
    storage_dir,
    second_storage_dir,
    tmp_path,
    monkeypatch,
):
    from playwright.sync_api import sync_playwright

    from .conftest import AsgiServer, _db_env, wait_for
    from .test_console_browser import canvas_matches_guest, tty1_text

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM beside Playwright's loop
    address, host_key, console_key = second_host_sshd
    Host.objects.filter(pk=second_host.pk).update(
        console_ssh=address, console_ssh_host_key=host_key
    )
    key, public = group_keypair
    vm = _provisioned_on_first(course, alice, ines, second_host, name="Live", public_key=public)
    old_port = vm.ssh_port
    wait_for_ssh(key, old_port, timeout=240)
    wait_for(lambda: "login:" in tty1_text(key, old_port), timeout=60, what="login prompt")
    boot_id = ssh(key, old_port, BOOT_ID).stdout.strip()
    # A process started before the move, still there after it.
    pid = ssh(key, old_port, "setsid sleep 100000 >/dev/null 2>&1 < /dev/null & echo $!").stdout
    pid = pid.strip()
    assert pid.isdigit()
    # An SSH session through the old forward, talking all along.
    loop = subprocess.Popen(
        [*_ssh_args(key, old_port), "while sleep 0.2; do echo tick; done"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert loop.stdout.readline().strip() == "tick"

    server = AsgiServer({**_db_env(), "CONSOLE_SSH_KEY": str(console_key)})
    try:
        with sync_playwright() as p:
            browser, console = _signed_in(p, server, alice, f"/vms/{vm.pk}/console/")
            group_page = console.context.new_page()  # the same signed-in browser
            group_page.goto(f"{server.url}/groups/{vm.group_id}/")
            ssh_line = group_page.locator(f"#ssh-{vm.pk}")
            assert f"-p {old_port} " in ssh_line.inner_text()
            status = console.locator("#console-status")
            console.locator("#console-status[data-state='connected']").wait_for()
            assert canvas_matches_guest(console, vm.domain_name, tmp_path, qemu_host.uri)

            # A move interrupted midway (its migration job aborted while it copies, held
            # back to 1 MiB/s so that it is still going): it fails saying so, the VM
            # runs on where it was under its open console, nothing is left on the other host.
            virsh_on(qemu_host.uri, "migrate-setspeed", vm.domain_name, "1")
            interrupted = vm_move_request(vm=vm, to=second_host, by=ines)
            wait_for(
                lambda: "% of" in Operation.objects.get(pk=interrupted.pk).progress,
                timeout=120,
                interval=0.2,
                what="the interrupted move to be copying",
            )
            assert virsh_on(qemu_host.uri, "domjobabort", vm.domain_name).returncode == 0
            wait_for(
                lambda: Operation.objects.get(pk=interrupted.pk).status == OperationStatus.FAILED,
                timeout=60,
                what="the interrupted move to fail",
            )
            interrupted.refresh_from_db()
            assert "migrating VM" in interrupted.error, interrupted.error
            assert interrupted.attempts == 1
            vm.refresh_from_db()
            assert vm.host == qemu_host and vm.ssh_port == old_port
            assert vm.observed_state == ObservedState.RUNNING
            assert _domains(second_host.uri) == []
            assert not list(second_storage_dir.glob(f"{vm.domain_name}*"))
            assert console.locator("#console-status").get_attribute("data-state") == "connected"
            assert loop.poll() is None  # the SSH session goes on too
            virsh_on(qemu_host.uri, "migrate-setspeed", vm.domain_name, "8796093022207")

            move = wait_operation(vm_move_request(vm=vm, to=second_host, by=ines), timeout=300)
            moved_at = time.monotonic()
            # The console came back by itself, to the VM on its new host, and says so.
            console.locator(
                f"#console-status[data-state='connected']:has-text('moved to {second_host.name}')"
            ).wait_for()
            back = time.monotonic() - moved_at
            assert status.inner_text() == f"Connected. The VM moved to {second_host.name}."
            wait_for(
                lambda: canvas_matches_guest(console, vm.domain_name, tmp_path, second_host.uri),
                timeout=30,
                what="the canvas to show the guest on its new host",
            )
            console.locator("#console-screen canvas").click()
            console.keyboard.type("moved42")
            vm.refresh_from_db()
            wait_for(
                lambda: "login: moved42" in tty1_text(key, vm.ssh_port),
                timeout=30,
                what="the typed text on the guest's tty1",
            )
            # The group's page shows the new SSH line, without a reload.
            wait_for(
                lambda: f"-p {vm.ssh_port} " in ssh_line.inner_text(),
                timeout=10,
                what="the new SSH line on the group's page",
            )
            browser.close()
    finally:
        server.stop()
        if loop.poll() is None:
            loop.kill()
    # The new host's console went through its SSH channel (its sockets are not this host's).
    assert f"console channel to {address} open" in server.log.read_text()
    # The session through the old forward ended with the old QEMU.
    assert loop.wait(timeout=30) != 0
    assert vm.host == second_host and vm.observed_state == ObservedState.RUNNING
    assert move.params["live"] is True
    assert second_host.ssh_port_min <= vm.ssh_port <= second_host.ssh_port_max
    assert virsh_on(second_host.uri, "domstate", vm.domain_name).stdout.strip() == "running"
    assert _domains(qemu_host.uri) == []
    assert not list(storage_dir.glob(f"{vm.domain_name}*"))
    # The new forward reaches the same running guest: the same boot, the same process.
    assert _answer(key, vm.ssh_port, BOOT_ID) == boot_id
    assert _answer(key, vm.ssh_port, f"kill -0 {pid} && echo alive") == "alive"
    print(f"\nlive move: {move.params['timings']}, console back after {back:.2f} s")

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice), timeout=120)
    assert _domains(second_host.uri) == []


@pytest.mark.sqlite_pass_only
def test_draining_a_host_moves_its_vms_and_lists_what_stayed(
    course,
    alice,
    ines,
    qemu_host,
    second_host,
    debian_template,
    worker,
    second_worker,
    group_keypair,
    storage_dir,
):
    key, public = group_keypair
    Host.objects.filter(pk=second_host.pk).update(enabled=False)
    debian_template.count = 3
    debian_template.save(update_fields=["count"])
    group = group_register(
        course=course,
        by=alice,
        name="Three",
        member_usernames=[],
        project_title="t",
        project_idea="i",
        ssh_public_key=public,
    )
    group_approve(group=group, by=ines)
    vms = list(group.vms.order_by("name"))
    assert len(vms) == 3
    for vm in vms:
        wait_operation(vm.operations.get(kind=OperationKind.PROVISION), timeout=300)
    Host.objects.filter(pk=second_host.pk).update(enabled=True)
    running, *stopped = vms
    for vm in stopped:  # two stopped (they move cold), one running (it moves live)
        wait_operation(vm_operation_request(vm=vm, kind=OperationKind.FORCE_OFF, by=alice))
    wait_operation(
        vm_operation_request(
            vm=running, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "keep"}
        )
    )

    # The running VM has a snapshot: it cannot move live, and stays, saying why.
    report = host_drain(host=qemu_host, by=None, parallel=2, timeout=600)
    assert sorted(report.moved) == [f"Three/{vm.name} -> {second_host.name}" for vm in stopped]
    assert [vm for vm, _ in report.stayed] == [f"Three/{running.name}"]
    assert "has snapshots, which a live move cannot take" in report.stayed[0][1]
    qemu_host.refresh_from_db()
    assert qemu_host.draining  # nothing new lands there meanwhile
    assert _domains(qemu_host.uri) == [running.domain_name]

    # Without it, the second drain moves the last one live and the host is empty.
    snapshot = running.snapshots.get()
    wait_operation(
        vm_operation_request(
            vm=running,
            kind=OperationKind.SNAPSHOT_DELETE,
            by=alice,
            params={"name": snapshot.name},
        )
    )
    report = host_drain(host=qemu_host, by=None, parallel=2, timeout=600)
    assert report.drained and report.moved == [f"Three/{running.name} -> {second_host.name}"]
    assert _domains(qemu_host.uri) == []
    assert list(storage_dir.iterdir()) == []
    assert sorted(_domains(second_host.uri)) == sorted(vm.domain_name for vm in vms)
    running.refresh_from_db()
    assert running.observed_state == ObservedState.RUNNING and running.host == second_host
    wait_for_ssh(key, running.ssh_port, timeout=240)


@pytest.mark.sqlite_pass_only
def test_registering_a_host_checks_its_console_channel_before_saving(
    qemu_host, second_libvirtd, second_host_sshd, debian_template, settings, tmp_path
):
    from io import StringIO

    from django.core.management import CommandError, call_command

    address, host_key, console_key = second_host_sshd
    settings.CONSOLE_SSH_KEY = str(console_key)
    arguments = ["--uri", second_libvirtd, "--storage-dir", str(tmp_path)]

    # Another server's key pinned: refused before anything is sent, nothing saved.
    impostor = " ".join(keypair(tmp_path / "impostor")[1].split()[:2])
    with pytest.raises(CommandError, match="console channel does not work"):
        call_command(
            "register_host", "hv3", *arguments, "--console-ssh", address,
            "--console-ssh-host-key", impostor, stdout=StringIO(),
        )  # fmt: skip
    assert not Host.objects.filter(name="hv3").exists()

    out = StringIO()
    call_command(
        "register_host", "hv3", *arguments, "--console-ssh", address,
        "--console-ssh-host-key", host_key, stdout=out,
    )  # fmt: skip
    assert f"consoles: through SSH to {address} (host key pinned)" in out.getvalue()
    host = Host.objects.get(name="hv3")
    assert (host.uri, host.console_ssh, host.console_ssh_host_key) == (
        second_libvirtd,
        address,
        host_key,
    )
