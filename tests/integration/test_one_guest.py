"""What needs one running guest and nothing else, on one booted guest for the module:
published ports, block volumes and SSH access, each through the services (or the group
page's form), a real Celery worker and QEMU.

One boot instead of three (each is about 40 s of TCG here). The module's rows (the
course, its people, this machine's host, the approved group and its VM) are made once,
outside any test's transaction, and outlive each test, so a test here takes
``one_guest`` and never ``db`` or ``transactional_db`` (their flush would take the rows
away). Each test leaves the guest running, as it found it, and says so first if it
does not. The tests run in the file's order: the ports; the volumes (whose reset boots a
new system disk); SSH access last (it changes the members and the group's key). After
the last one the module removes the guest, stops its worker and empties the database.
"""

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client, override_settings

from labs.choices import ObservedState, OperationKind, OperationStatus, PortState, Role
from labs.compute import volumes
from labs.compute.requests import vm_operation_request
from labs.models import Course, Host, Membership, Operation, Publication, Snapshot, Vm, Volume
from labs.people.groups import group_key_replace, membership_group_set

from .conftest import (
    PREFIX,
    Worker,
    _db_env,
    approve_new_group,
    debian_template_row,
    guests_remove,
    keypair,
    qemu_host_row,
    sha256,
    ssh,
    wait_for,
    wait_for_ssh,
    wait_operation,
)

# Its rows are the unit suite's, which runs on PostgreSQL too (tests/compute).
pytestmark = [pytest.mark.integration, pytest.mark.sqlite_pass_only]


@dataclass
class OneGuest:
    course: Course
    alice: object  # created the group
    bob: object  # alice's teammate
    carol: object  # a student in no group
    ines: object  # the instructor
    host: Host
    vm_id: int
    key: Path  # the group's private key (test_ssh_access replaces it: it says so here)

    def vm(self) -> Vm:
        return Vm.objects.select_related("group", "host").get(pk=self.vm_id)


def _person(course: Course, username: str, role: str = Role.STUDENT):
    user = get_user_model().objects.create_user(
        username=username, email=f"{username}@example.edu", password=None,
        first_name=username.capitalize(), is_staff=role != Role.STUDENT,
    )  # fmt: skip
    Membership.objects.create(course=course, user=user, role=role)
    return user


@pytest.fixture(scope="module")
def one_guest(django_db_setup, django_db_blocker, storage_dir, base_image, tmp_path_factory):
    key, public = keypair(tmp_path_factory.mktemp("one-guest") / "group_key")
    worker = None
    try:
        with django_db_blocker.unblock(), override_settings(STRATUS_DOMAIN_PREFIX=PREFIX):
            course = Course.objects.create(
                slug="os101", title="Operating Systems", term="Fall 2026"
            )
            alice, bob, carol = (_person(course, n) for n in ("alice", "bob", "carol"))
            ines = _person(course, "ines", Role.INSTRUCTOR)
            host = qemu_host_row(storage_dir)
            debian_template_row(course, base_image)
            worker = Worker(connection.settings_dict["NAME"], _db_env())
            worker.start()
            vm, provision = approve_new_group(
                course, by=alice, reviewer=ines, name="One", public_key=public, members=["bob"]
            )
            wait_operation(provision, timeout=180)
            vm.refresh_from_db()
            wait_for_ssh(key, vm.ssh_port)
        yield OneGuest(course, alice, bob, carol, ines, host, vm.pk, key)
    finally:
        if worker is not None:
            worker.stop()
        guests_remove(storage_dir)
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(autouse=True)
def _running_guest(one_guest, django_db_blocker):
    """Each test reaches the database as the module's rows do, and starts with the guest
    running and answering SSH."""
    with django_db_blocker.unblock():
        vm = one_guest.vm()
        if vm.observed_state != ObservedState.RUNNING:
            pytest.fail(f"the module's guest is {vm.observed_state}: an earlier test left it so")
        wait_for_ssh(one_guest.key, vm.ssh_port, timeout=120)
        yield


def last_op(vm, kind) -> Operation:
    return Operation.objects.filter(vm=vm, kind=kind).latest("pk")


# --- published ports --------------------------------------------------------------------------
# A web server in the guest answers on the host's loopback at the allocated port (slirp's
# restrict=on lets the forward through, like SSH's), stops answering once unpublished, is
# shown closed while the VM is shut down (QEMU is gone) and answers again after the VM
# starts (the definition carries the forward). Prints the time from the publish POST to
# the port answering, and the unpublish's (docs/performance.md).

GUEST_PORT = 8080


def serve(key, port: int, token: str) -> None:
    """A web server in the guest on every address, serving ``token`` (backgrounded)."""
    command = (
        f"mkdir -p /tmp/www && echo {token} > /tmp/www/index.html && cd /tmp/www && "
        f"(nohup setsid python3 -m http.server {GUEST_PORT} --bind 0.0.0.0 "
        "> /dev/null 2>&1 < /dev/null &) && sleep 0.2 && echo started"
    )
    result = ssh(key, port, command, timeout=60)
    assert result.stdout.strip() == "started", result.stderr
    ready = f"timeout 2 bash -c '</dev/tcp/127.0.0.1/{GUEST_PORT}'"

    def listening() -> bool:
        try:
            return ssh(key, port, ready, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:  # a loaded host: TCG guests answer slowly
            return False

    wait_for(listening, timeout=90, interval=1, what="the guest's web server")


def fetch(port: int) -> str | None:
    """The page on the host's loopback; None when nothing answers (refused, or reset)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as reply:  # noqa: S310
            return reply.read().decode().strip()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)  # noqa: S310
    except urllib.error.URLError as error:
        return isinstance(error.reason, ConnectionRefusedError)
    return False


def test_a_published_port_answers_on_the_host_closes_when_unpublished_and_after_a_stop(
    one_guest,
):
    key, alice, qemu_host = one_guest.key, one_guest.alice, one_guest.host
    vm = one_guest.vm()
    token = secrets.token_hex(8)
    serve(key, vm.ssh_port, token)

    client = Client()
    client.force_login(alice)
    page = f"/groups/{vm.group_id}/"

    # Publish through the group page's form: the worker adds the forward to the running QEMU.
    asked = time.monotonic()
    reply = client.post(f"/vms/{vm.pk}/ports/publish/", {"guest_port": GUEST_PORT}, follow=True)
    pub = Publication.objects.get(vm=vm)
    assert qemu_host.published_port_min <= pub.host_port <= qemu_host.published_port_max
    assert f"Publishing port {GUEST_PORT} of {vm.name} on port {pub.host_port}" in reply.text
    wait_operation(last_op(vm, OperationKind.PORT_PUBLISH), timeout=60)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.1) == token
    answered = time.monotonic() - asked
    pub.refresh_from_db()
    assert pub.state == PortState.PUBLISHED
    assert f'href="http://127.0.0.1:{pub.host_port}/"' in client.get(page).text
    publish_s = last_op(vm, OperationKind.PORT_PUBLISH).params["timings"]["publish_s"]

    # Unpublish: the host port stops answering at once, and is free again.
    asked = time.monotonic()
    client.post(f"/ports/{pub.pk}/unpublish/")
    wait_operation(last_op(vm, OperationKind.PORT_UNPUBLISH), timeout=60)
    assert wait_for(lambda: refused(pub.host_port), timeout=10, interval=0.1)
    closed = time.monotonic() - asked
    assert not Publication.objects.filter(vm=vm).exists()
    assert f"127.0.0.1:{pub.host_port}" not in client.get(page).text
    unpublish_s = last_op(vm, OperationKind.PORT_UNPUBLISH).params["timings"]["unpublish_s"]

    # Published again, then the VM shut down: nothing listens, the page says closed.
    client.post(f"/vms/{vm.pk}/ports/publish/", {"guest_port": GUEST_PORT})
    wait_operation(last_op(vm, OperationKind.PORT_PUBLISH), timeout=60)
    pub = Publication.objects.get(vm=vm)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.1) == token
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=90)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    assert refused(pub.host_port)
    html = client.get(page).text
    assert f"closed while {vm.name} is not running" in html
    assert f'href="http://127.0.0.1:{pub.host_port}/"' not in html

    # Started again: the domain's definition forwards it from the start.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.START, by=alice), timeout=60)
    wait_for_ssh(key, vm.ssh_port)
    serve(key, vm.ssh_port, token)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.2) == token
    assert f'href="http://127.0.0.1:{pub.host_port}/"' in client.get(page).text
    print(
        f"\npublish: POST to the port answering {answered:.2f} s (driver {publish_s:.3f} s); "
        f"unpublish: POST to refused {closed:.2f} s (driver {unpublish_s:.3f} s)"
    )
    # As it was for the next test: no port published.
    client.post(f"/ports/{pub.pk}/unpublish/")
    wait_operation(last_op(vm, OperationKind.PORT_UNPUBLISH), timeout=60)


# --- block volumes ----------------------------------------------------------------------------
# Hot-plugged into the running guest (it appears by serial), a file written on it, kept
# across a reset of the VM (only the system disk is made again; the volume is attached to
# the new domain), in a snapshot taken while attached, detached (gone from the guest) and
# deleted (gone from the host). Prints the attach and detach times (docs/performance.md).


def qemu_img_snapshots(path: str) -> list[str]:
    """The internal snapshots a qcow2 file holds (-U: the running QEMU holds its lock)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [s["name"] for s in json.loads(out).get("snapshots", [])]


def in_guest(key, port, path: str) -> bool:
    return ssh(key, port, f"test -e {path}").returncode == 0


def test_a_volume_is_hot_plugged_keeps_its_file_across_a_reset_and_detaches(one_guest, base_image):
    key, alice, bob, qemu_host = one_guest.key, one_guest.alice, one_guest.bob, one_guest.host
    vm = one_guest.vm()
    checksum_before = sha256(base_image)

    # A new 1 GiB volume, hot-plugged into the running guest: it appears by its serial.
    op = wait_operation(
        volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice), timeout=60
    )
    asked = time.monotonic()
    volume = Volume.objects.get(pk=op.params["volume"])
    by_id = volume.guest_path
    wait_for(lambda: in_guest(key, vm.ssh_port, by_id), timeout=30, interval=0.3, what=by_id)
    seen = time.monotonic() - asked
    lsblk = ssh(key, vm.ssh_port, "lsblk -dno NAME,SERIAL,SIZE").stdout
    assert volume.serial in lsblk and "1G" in lsblk, lsblk
    attach = op.params["timings"]
    print(
        f"\nvolume create {attach['create_s']:.3f} s, attach (hot-plug) {attach['attach_s']:.3f}"
        f" s; in the guest {seen:.2f} s after the operation ended"
    )

    # A file system and a file on it.
    write = (
        f"sudo mkfs.ext4 -q -F {by_id} && sudo mkdir -p /mnt/data && "
        f"sudo mount {by_id} /mnt/data && echo kept-across-reset | sudo tee /mnt/data/f "
        "&& sync && sudo umount /mnt/data"
    )
    result = ssh(key, vm.ssh_port, write, timeout=60)
    assert result.returncode == 0, result.stderr

    # A snapshot taken while it is attached holds the volume too (inside its own qcow2).
    snap = vm_operation_request(vm=vm, kind=OperationKind.SNAPSHOT, by=bob, params={"name": "s1"})
    wait_operation(snap, timeout=60)
    assert Snapshot.objects.get(vm=vm, name="s1").volumes[0]["serial"] == volume.serial
    volume_file = f"{qemu_host.storage_dir}/{volume.file_name}"
    overlay_file = f"{qemu_host.storage_dir}/{vm.domain_name}.qcow2"
    assert qemu_img_snapshots(volume_file) == ["s1"]
    assert qemu_img_snapshots(overlay_file) == ["s1"]
    print(f"snapshot s1 is held by the overlay and by the volume's qcow2 ({volume_file})")

    # Reset to baseline: a fresh system disk, the volume attached again with its file.
    reset = vm_operation_request(vm=vm, kind=OperationKind.RESET, by=alice)
    wait_operation(reset, timeout=180)
    wait_for_ssh(key, vm.ssh_port)
    assert ssh(key, vm.ssh_port, "test -e /mnt/data; echo $?").stdout.strip() == "1"  # new disk
    wait_for(lambda: in_guest(key, vm.ssh_port, by_id), timeout=30, what=f"{by_id} after reset")
    read = f"sudo mkdir -p /mnt/data && sudo mount {by_id} /mnt/data && cat /mnt/data/f"
    assert ssh(key, vm.ssh_port, read).stdout.strip() == "kept-across-reset"
    assert ssh(key, vm.ssh_port, "sudo umount /mnt/data").returncode == 0
    volume.refresh_from_db()
    assert volume.vm_id == vm.pk
    assert qemu_img_snapshots(volume_file) == []  # the reset took s1 out of the volume too

    # Detach: gone from the guest (and from lsblk).
    op = wait_operation(volumes.volume_detach_request(volume=volume, by=bob), timeout=60)
    assert not in_guest(key, vm.ssh_port, by_id)
    assert volume.serial not in ssh(key, vm.ssh_port, "lsblk -dno NAME,SERIAL").stdout
    print(f"volume detach {op.params['timings']['detach_s']:.3f} s (the guest let it go)")

    # Delete: the file is gone from the host.
    op = wait_operation(volumes.volume_delete_request(volume=volume, by=alice), timeout=60)
    assert not Volume.objects.filter(pk=volume.pk).exists()
    assert subprocess.run(["test", "-e", volume_file]).returncode == 1
    assert sha256(base_image) == checksum_before


# --- SSH access -------------------------------------------------------------------------------
# SSH access follows the group through the guest's agent, without a reset: a member taken
# out (their login refused, the others' work), the group's key replaced (the old key
# refused, the new one works), a member added (an account of their own, with sudo), and a
# revert to a snapshot taken before all that (the old accounts and key come back on the
# disk; the update that follows the revert takes them out again). The guest's boot id never
# changes: no reset, no reboot.

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def _last_sync(vm: Vm, after: int) -> Operation:
    def made():
        return vm.operations.filter(kind=OperationKind.SSH_SYNC, pk__gt=after).first()

    wait_for(made, timeout=30, what="an SSH-access update to be asked for")
    return wait_operation(made(), timeout=180)


def _answer(key, port, command="true", user="student"):
    """``command`` run as ``user`` with ``key``: sshd's own answer, whether it let the user in
    or refused them. A connection that failed otherwise (ssh's 255 without a refusal: a guest
    slow to answer under TCG) is tried again, so that no answer can come from a timeout."""
    for attempt in range(6):
        result = ssh(key, port, command, user=user, timeout=60)
        if result.returncode != 255 or "Permission denied" in result.stderr:
            return result
        time.sleep(2 * attempt + 1)  # a busy guest's sshd resets new connections for a while
    raise AssertionError(f"ssh as {user} neither logged in nor was refused: {result.stderr}")


def _logs_in(key, port, user) -> bool:
    return _answer(key, port, user=user).returncode == 0


def _boot_id(key, port) -> str:
    result = _answer(key, port, BOOT_ID)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_ssh_access_follows_members_and_key_without_a_reset(one_guest, tmp_path):
    old_key, alice, bob, carol, ines = (
        one_guest.key, one_guest.alice, one_guest.bob, one_guest.carol, one_guest.ines
    )  # fmt: skip
    vm = one_guest.vm()
    port = vm.ssh_port
    boot_id = _boot_id(old_key, port)
    assert _logs_in(old_key, port, "bob") and _logs_in(old_key, port, "alice")
    wait_operation(
        vm_operation_request(
            vm=vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "before"}
        )
    )
    mark = Operation.objects.latest("pk").pk

    # Bob leaves: his account is disabled, the others still log in.
    membership_group_set(membership=bob.memberships.get(), group=None, by=ines)
    op = _last_sync(vm, mark)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    assert not _logs_in(old_key, port, "bob")
    assert _logs_in(old_key, port, "alice") and _logs_in(old_key, port, "student")

    # The key is replaced (bob may still hold the old one): it stops working everywhere.
    new_key, new_public = keypair(tmp_path / "new_key")
    group_key_replace(group=vm.group, by=alice, ssh_public_key=new_public)
    op = _last_sync(vm, op.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    one_guest.key = new_key  # the group's key from now on, for whatever comes after
    for user in ("student", "alice"):
        assert not _logs_in(old_key, port, user)
        assert _logs_in(new_key, port, user)

    # Carol joins: an account of her own, with the group's key and sudo, as the seed gives.
    membership_group_set(membership=carol.memberships.get(), group=vm.group, by=ines)
    op = _last_sync(vm, op.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    result = _answer(new_key, port, "sudo -n id -u", user="carol")
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr

    # A revert brings back the disk of before (bob, the old key): the update follows it.
    revert = vm_operation_request(
        vm=vm, kind=OperationKind.REVERT, by=alice, params={"name": "before"}
    )
    wait_operation(revert)
    op = _last_sync(vm, revert.pk)
    assert op.status == OperationStatus.SUCCEEDED, op.error
    wait_for_ssh(new_key, port)
    assert not _logs_in(old_key, port, "bob")
    assert not _logs_in(old_key, port, "student")
    assert _logs_in(new_key, port, "carol")

    assert _boot_id(new_key, port) == boot_id  # never reset nor rebooted
    vm.refresh_from_db()
    assert not vm.ssh_sync_due
    assert vm.ssh_accounts == ["student", "alice", "bob", "carol"]  # bob: to keep disabled
