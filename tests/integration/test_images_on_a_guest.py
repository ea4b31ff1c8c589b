"""Course images on real guests: an instructor's prepared VM captured while it runs, the
course's template switched to the capture, and a new group's VM booted from it holding
the instructor's file, with an SSH host key, machine-id and logins of its own. A hostile
upload is refused with its reason on the way.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from labs.choices import ImageCopyState, ImageSource, OperationKind
from labs.compute import images
from labs.compute.requests import vm_operation_request
from labs.drivers.base import HypervisorError
from labs.errors import Refused
from labs.models import Image

from .conftest import (
    RUN,
    _virsh,
    approve_new_group,
    keypair,
    sha256,
    ssh,
    wait_for_ssh,
    wait_operation,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PREPARED = "prepared by the instructor for the web lab"


@pytest.fixture
def image_store(settings):
    """This run's image store, for the worker and for this process."""
    path = Path(f"/var/lib/stratus/test-{RUN}-images")
    path.mkdir(parents=True, mode=0o755, exist_ok=True)
    path.chmod(0o755)  # QEMU (libvirt-qemu) reads the captured base through it
    settings.STRATUS_IMAGE_DIR = str(path)
    yield path
    for pool in _virsh("pool-list", "--all", "--name").stdout.split():
        if f"<path>{path}</path>" in _virsh("pool-dumpxml", pool).stdout:
            _virsh("pool-destroy", pool)
            _virsh("pool-undefine", pool)
    shutil.rmtree(path, ignore_errors=True)


def host_key(port: int) -> str:
    """The ed25519 host key the guest's sshd presents."""
    out = subprocess.run(
        ["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    keys = [line.split(None, 1)[1] for line in out.splitlines() if not line.startswith("#")]
    assert keys, f"no host key from 127.0.0.1:{port}"
    return keys[0]


def run(key, port, command: str) -> str:
    result = ssh(key, port, command, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.sqlite_pass_only
def test_a_captured_vm_boots_a_new_vm_with_the_file_and_an_identity_of_its_own(
    course, alice, carol, ines, qemu_host, debian_template, base_image, image_store, tmp_path
):
    from .conftest import Worker, _db_env

    base_sha = sha256(base_image)
    worker = Worker("", {**_db_env(), "STRATUS_IMAGE_DIR": str(image_store)})
    worker.start()
    try:
        _walk_through(course, alice, carol, ines, debian_template, image_store, tmp_path)
    finally:
        worker.stop()
    assert sha256(base_image) == base_sha  # the shared base image was only ever read


def _walk_through(course, alice, carol, ines, template, image_store, tmp_path):
    # A hostile upload first: refused, nothing left in the store.
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
         str(evil), "1G"], check=True,
    )  # fmt: skip
    with pytest.raises(Refused, match=r"names a backing file \(/etc/shadow\)"):
        images.image_import(path=str(evil), course=course, name="evil")
    assert list(image_store.iterdir()) == []

    # The instructor prepares a VM (here: the group Source's).
    source_key, source_public = keypair(tmp_path / "source_key")
    source, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Source", public_key=source_public
    )
    wait_operation(provision, timeout=240)
    source.refresh_from_db()
    wait_for_ssh(source_key, source.ssh_port)
    run(source_key, source.ssh_port, f"echo '{PREPARED}' | sudo tee /opt/lab.txt && sync")
    source_host_key = host_key(source.ssh_port)
    source_machine_id = run(source_key, source.ssh_port, "cat /etc/machine-id")

    # Captured while it runs (its file systems frozen for the copy), then the template.
    op = images.vm_capture_request(vm=source, name=f"web-lab-{RUN}", by=ines)
    op = wait_operation(op, timeout=600)
    image = Image.objects.get(name=f"web-lab-{RUN}")
    assert (image.source, image.course, image.captured_from) == (
        ImageSource.CAPTURED, course, source)  # fmt: skip
    assert image.sha256 == sha256(Path(image.path))
    assert [c.state for c in image.copies.all()] == [ImageCopyState.PRESENT]
    assert run(source_key, source.ssh_port, "cat /opt/lab.txt") == PREPARED  # still running
    run(source_key, source.ssh_port, "echo later | sudo tee /opt/after-capture.txt")
    images.template_image_set(template=template, image=image, by=ines)
    source.refresh_from_db()
    assert source.image != image  # an existing VM keeps its backing file until reset

    # A new group's VM boots from the capture.
    new_key, new_public = keypair(tmp_path / "new_key")
    vm, provision = approve_new_group(
        course, by=carol, reviewer=ines, name="Newcomers", public_key=new_public
    )
    wait_operation(provision, timeout=240)
    vm.refresh_from_db()
    assert vm.image == image
    wait_for_ssh(new_key, vm.ssh_port)
    assert run(new_key, vm.ssh_port, "cat /opt/lab.txt") == PREPARED
    assert host_key(vm.ssh_port) != source_host_key
    machine_id = run(new_key, vm.ssh_port, "cat /etc/machine-id")
    assert len(machine_id) == 32 and machine_id != source_machine_id
    # The source group's key is not among the new VM's logins.
    refused = ssh(source_key, vm.ssh_port, "true", timeout=60)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr

    # A reset of the source rebuilds its disk on the template's image: the capture's file,
    # not what was written after it.
    reset = vm_operation_request(vm=source, kind=OperationKind.RESET, by=ines)
    wait_operation(reset, timeout=240)
    source.refresh_from_db()
    assert source.image == image
    wait_for_ssh(source_key, source.ssh_port)
    assert run(source_key, source.ssh_port, "cat /opt/lab.txt") == PREPARED
    assert run(source_key, source.ssh_port, "ls /opt") == "lab.txt"
    assert host_key(source.ssh_port) != source_host_key


def test_an_image_file_streams_to_a_host_and_back_checksummed(tmp_path, image_store):
    """The copy path of a distribution on the real libvirtd: streamed into a volume at the
    same path, read back for its sha256, never written over."""
    from labs.drivers.registry import driver_at

    upload = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(upload), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(upload)],
        check=True,
        capture_output=True,
    )
    target = image_store / "streamed.qcow2"
    driver = driver_at("qemu:///system", host_name="local")
    assert driver.image_digest(str(target)) is None
    driver.image_put(str(upload), str(target))
    assert driver.image_digest(str(target)) == sha256(upload)
    assert target.read_bytes() == upload.read_bytes()
    assert target.stat().st_mode & 0o777 == 0o444
    with pytest.raises(HypervisorError, match="has a file at .* already"):
        driver.image_put(str(upload), str(target))
