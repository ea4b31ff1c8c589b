"""A block volume on a real guest, through the services, a real Celery worker and QEMU:
hot-plugged into the running guest (it appears by serial), a file written on it, kept
across a reset of the VM (only the system disk is made again; the volume is attached to
the new domain), in a snapshot taken while attached, detached (gone from the guest) and
deleted (gone from the host). Prints the attach and detach times (docs/performance.md)."""

import json
import subprocess
import time

import pytest

from labs.choices import ObservedState, OperationKind
from labs.compute import volumes
from labs.compute.requests import vm_operation_request
from labs.models import Snapshot, Volume

from .conftest import approve_new_group, sha256, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


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


@pytest.mark.sqlite_pass_only  # its rows are the unit suite's, which runs on PostgreSQL
def test_a_volume_is_hot_plugged_keeps_its_file_across_a_reset_and_detaches(
    course, alice, bob, ines, qemu_host, debian_template, worker, group_keypair, base_image
):
    key, public = group_keypair
    checksum_before = sha256(base_image)
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Volumes", public_key=public, members=["bob"]
    )
    wait_operation(provision, timeout=120)
    wait_for_ssh(key, vm.ssh_port)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING

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
