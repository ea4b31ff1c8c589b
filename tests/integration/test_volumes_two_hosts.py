"""A block volume moves with its VM on a cold move between two hosts: copied beside the
overlay on the destination with the same serial and the file written on it, and gone
from the source (the second host is scripts/second-libvirtd.sh's, as in test_two_hosts)."""

import pytest

from labs.choices import ObservedState, OperationKind
from labs.compute import volumes
from labs.compute.moves import vm_move_request
from labs.compute.requests import vm_operation_request
from labs.errors import Refused
from labs.models import Host, Volume

from .conftest import approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.mark.sqlite_pass_only
def test_a_volume_moves_cold_with_its_vm_and_keeps_its_serial_and_files(
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
    key, public = group_keypair
    Host.objects.filter(pk=second_host.pk).update(enabled=False)
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Carrier", public_key=public
    )
    wait_operation(provision, timeout=240)
    Host.objects.filter(pk=second_host.pk).update(enabled=True)
    vm.refresh_from_db()
    wait_for_ssh(key, vm.ssh_port)
    op = wait_operation(volumes.volume_create_request(vm=vm, name="data", size_gib=1, by=alice))
    volume = Volume.objects.get(pk=op.params["volume"])
    by_id = volume.guest_path
    wait_for(lambda: ssh(key, vm.ssh_port, f"test -e {by_id}").returncode == 0, timeout=30)
    write = (
        f"sudo mkfs.ext4 -q -F {by_id} && sudo mkdir -p /mnt/d && sudo mount {by_id} /mnt/d "
        "&& echo moved-along | sudo tee /mnt/d/f && sync && sudo umount /mnt/d"
    )
    assert ssh(key, vm.ssh_port, write, timeout=60).returncode == 0

    # Running: a live move is refused; stopped, it moves cold with the volume.
    with pytest.raises(Refused, match="has block volumes"):
        vm_move_request(vm=vm, to=second_host, by=ines)
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=120)
    move = wait_operation(vm_move_request(vm=vm, to=second_host, by=ines), timeout=300)
    print(f"\ncold move with a 1 GiB volume: {move.params['timings']}")
    vm.refresh_from_db()
    volume.refresh_from_db()
    assert vm.host == second_host and volume.host == second_host and volume.vm == vm
    assert (second_storage_dir / volume.file_name).exists()
    assert not (storage_dir / volume.file_name).exists()

    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.START, by=alice), timeout=120)
    wait_for_ssh(key, vm.ssh_port)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING
    wait_for(lambda: ssh(key, vm.ssh_port, f"test -e {by_id}").returncode == 0, timeout=30)
    read = f"sudo mkdir -p /mnt/d && sudo mount {by_id} /mnt/d && cat /mnt/d/f"
    assert ssh(key, vm.ssh_port, read).stdout.strip() == "moved-along"

    # Deleting the VM keeps the volume (detached); its deletion runs on the second host.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice), timeout=120)
    volume.refresh_from_db()
    assert volume.vm is None and (second_storage_dir / volume.file_name).exists()
    wait_operation(volumes.volume_delete_request(volume=volume, by=alice))
    assert not (second_storage_dir / volume.file_name).exists()
