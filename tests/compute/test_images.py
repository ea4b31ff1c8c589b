"""Course images as services: imports that leave nothing behind when refused, captures
asked for by the course's instructors only, copies per host that placement and resets
respect, the template's switch and deletion refused while in use.

The hypervisor side of a copy is a small in-memory host (``HostFiles``): what is tested
here is what Stratus records and decides; the qemu-img and debugfs work is tested on real
files in tests/drivers, and the whole path on a real guest in tests/integration.
"""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from labs.choices import ImageCopyState, ImageSource, ObservedState, OperationKind
from labs.compute import image_copies, images, placement
from labs.compute.image_copies import image_distribute, image_for_reset
from labs.drivers.base import HypervisorError
from labs.errors import Invalid, NotAllowed, Refused
from labs.models import Host, Image, ImageCopy, Operation, Vm, VmTemplate

pytestmark = pytest.mark.django_db


class HostFiles:
    """Each host's files by path, as image_digest and image_put see them."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}
        self.unreachable: set[str] = set()

    def driver(self, host):
        files = self

        class Driver:
            def image_digest(self, path):
                if host.name in files.unreachable:
                    raise HypervisorError(f"host {host.name} did not answer")
                data = files.files.get((host.name, path))
                return None if data is None else hashlib.sha256(data).hexdigest()

            def image_put(self, source, path):
                files.files[(host.name, path)] = Path(source).read_bytes()

        return Driver()


@pytest.fixture
def hosts(monkeypatch):
    files = HostFiles()
    monkeypatch.setattr(image_copies, "driver_for", files.driver)
    return files


@pytest.fixture
def store(tmp_path, settings):
    settings.STRATUS_IMAGE_DIR = str(tmp_path / "images")
    return tmp_path / "images"


@pytest.fixture
def h1(db):
    return Host.objects.get_or_create(
        name="h1",
        defaults={"uri": "qemu:///system", "vcpus": 8, "memory_mib": 16384, "disk_gib": 200},
    )[0]


@pytest.fixture
def h2(db):
    return Host.objects.create(
        name="h2", uri="test:///default", vcpus=8, memory_mib=16384, disk_gib=200
    )


@pytest.fixture
def upload(tmp_path) -> Path:
    path = tmp_path / "upload.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def test_an_import_is_stored_read_only_checksummed_and_copied_to_every_host(
    upload, store, course, h1, h2, hosts
):
    done = images.image_import(path=str(upload), course=course, name="web-lab")
    image = done.image
    stored = store / "web-lab.qcow2"
    assert image.path == str(stored) and stored.stat().st_mode & 0o777 == 0o444
    assert image.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert (image.source, image.everywhere, image.course) == (ImageSource.IMPORTED, False, course)
    assert image.virtual_size == 16 * 2**20 and image.size_gib == 1
    assert {c.host.name: c.state for c in done.copies} == {"h1": "present", "h2": "present"}
    assert hosts.files[("h2", str(stored))] == stored.read_bytes()
    assert sorted(p.name for p in store.iterdir()) == ["web-lab.qcow2"]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: ["create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
                    str(d / "f.qcow2"), "1M"], "names a backing file (/etc/hostname)"),
        (lambda d: ["create", "-q", "-f", "qcow2", "-o", f"data_file={d}/new.data",
                    str(d / "f.qcow2"), "1M"], "external data file"),
        (lambda d: ["create", "-q", "-f", "raw", str(d / "f.qcow2"), "1M"], "not a qcow2 image"),
        (lambda d: ["create", "-q", "-f", "qcow2", str(d / "f.qcow2"), "65G"],
         "the limit is 64 GiB"),
    ],
    ids=["backing-file", "data-file", "raw", "too-large"],
)  # fmt: skip
def test_a_refused_import_names_the_reason_and_leaves_no_row_and_no_file(
    tmp_path, store, course, h1, hosts, make, reason
):
    upload = tmp_path / "up"
    upload.mkdir()
    subprocess.run(["qemu-img", *make(upload)], check=True, capture_output=True)
    with pytest.raises(Refused, match="Image refused: .*" + reason.replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        images.image_import(path=str(upload / "f.qcow2"), course=course, name="evil")
    assert not Image.objects.filter(name="evil").exists()
    assert not store.exists() or list(store.iterdir()) == []
    assert not ImageCopy.objects.exists() and hosts.files == {}


def test_an_import_under_a_taken_name_or_no_slug_is_refused(upload, store, course, hosts):
    Image.objects.create(name="deb", os="Debian", path="/srv/deb.qcow2")
    with pytest.raises(Refused, match="An image named deb exists already"):
        images.image_import(path=str(upload), course=course, name="deb")
    with pytest.raises(Invalid, match="slug"):
        images.image_import(path=str(upload), course=course, name="../etc/x")


def test_a_host_that_does_not_answer_gets_a_failed_copy_with_the_reason(
    upload, store, course, h1, h2, hosts
):
    hosts.unreachable.add("h2")
    done = images.image_import(path=str(upload), course=course, name="web-lab")
    copies = {c.host.name: c for c in done.copies}
    assert copies["h1"].state == ImageCopyState.PRESENT
    assert copies["h2"].state == ImageCopyState.FAILED
    assert "did not answer" in copies["h2"].error
    hosts.unreachable.clear()
    again = image_distribute(image=done.image)
    assert [(c.host.name, c.state) for c in again] == [("h2", "present")]


def test_a_different_file_at_the_path_on_a_host_is_not_overwritten(
    upload, store, course, h1, hosts
):
    hosts.files[("h1", str(store / "web-lab.qcow2"))] = b"someone else's file"
    done = images.image_import(path=str(upload), course=course, name="web-lab")
    assert done.copies[0].state == ImageCopyState.FAILED
    assert "is not this image" in done.copies[0].error
    assert hosts.files[("h1", str(store / "web-lab.qcow2"))] == b"someone else's file"


# --- placement and resets ---------------------------------------------------------------------


@pytest.fixture
def imported(store, course, h1, upload, hosts):
    return images.image_import(path=str(upload), course=course, name="web-lab", distribute=False)


def test_a_vm_on_an_imported_image_waits_until_a_host_holds_it(
    imported, make_vm, group_a, h1, hosts
):
    vm = make_vm(group_a, host=None, observed_state=ObservedState.NEW, image=imported.image)
    assert placement.vm_place(vm=vm) is False
    vm.refresh_from_db()
    assert "no host that is up holds its image web-lab yet" in vm.status_message
    image_distribute(image=imported.image)
    assert placement.vm_place(vm=vm) is True
    vm.refresh_from_db()
    assert vm.host == h1


def test_placement_skips_a_host_without_the_image(imported, make_vm, group_a, h1, h2, hosts):
    image_distribute(image=imported.image, hosts=Host.objects.filter(name="h2"))
    vm = make_vm(group_a, host=None, observed_state=ObservedState.NEW, image=imported.image)
    assert placement.vm_place(vm=vm) is True
    vm.refresh_from_db()
    assert vm.host.name == "h2"


@pytest.fixture
def template(course, make_vm, group_a):
    vm = make_vm(group_a)  # makes the built image "deb" and host h1
    return VmTemplate.objects.create(course=course, image=vm.image)


def test_a_reset_rebuilds_on_the_templates_new_image_once_the_host_holds_it(
    template, imported, ines, hosts
):
    vm = Vm.objects.get()
    old = vm.image
    image_distribute(image=imported.image)
    images.template_image_set(template=template, image=imported.image, by=ines)
    vm.refresh_from_db()
    assert vm.image == old  # existing VMs keep their backing file until reset
    assert image_for_reset(vm) == imported.image
    vm.refresh_from_db()
    assert vm.image == imported.image


def test_a_reset_onto_an_image_its_host_lacks_is_refused_and_changes_nothing(
    template, imported, hosts
):
    VmTemplate.objects.filter(pk=template.pk).update(image=imported.image)
    vm = Vm.objects.select_related("group__course__vm_template__image", "host").get()
    with pytest.raises(HypervisorError, match="not on host h1 yet"):
        image_for_reset(vm)
    assert Vm.objects.get().image.name == "deb"


# --- the template's image: who, and which images -------------------------------------------------


def test_only_the_courses_instructors_switch_its_image(template, imported, tara, olga, hosts):
    image_distribute(image=imported.image)
    for who in (tara, olga):
        with pytest.raises(NotAllowed):
            images.template_image_set(template=template, image=imported.image, by=who)
    assert VmTemplate.objects.get().image.name == "deb"


def test_an_image_of_another_course_or_on_no_host_is_refused(
    template, imported, other_course, ines, hosts
):
    with pytest.raises(Refused, match="No host holds the image web-lab yet"):
        images.template_image_set(template=template, image=imported.image, by=ines)
    theirs = Image.objects.create(name="theirs", os="x", path="/x.qcow2", course=other_course)
    with pytest.raises(Refused, match="belongs to another course"):
        images.template_image_set(template=template, image=theirs, by=ines)


def test_an_image_in_use_cannot_be_deleted_or_replaced(template, imported, tmp_path, hosts):
    deb = template.image
    with pytest.raises(Refused, match="the template of os101 uses it"):
        images.image_delete(image=deb)
    VmTemplate.objects.all().delete()
    with pytest.raises(Refused, match="1 VM\\(s\\) have their disk on it"):
        images.image_delete(image=deb)
    from django.core.exceptions import ValidationError

    from labs.tooling.registration import image_register

    other = tmp_path / "other.qcow2"
    shutil.copy(imported.image.path, other)
    with pytest.raises(ValidationError, match="in use"):
        image_register(name="deb", path=other, os="Debian")
    assert Image.objects.get(name="deb").path == "/srv/base.qcow2"


def test_an_unused_image_is_deleted_with_its_file(imported, hosts):
    path = Path(imported.image.path)
    images.image_delete(image=imported.image)
    assert not Image.objects.filter(name="web-lab").exists() and not path.exists()


# --- capture ------------------------------------------------------------------------------


def test_the_courses_instructor_asks_for_a_capture_of_a_running_vm(make_vm, group_a, ines, sent):
    vm = make_vm(group_a)
    op = images.vm_capture_request(vm=vm, name="prepared", by=ines)
    assert (op.kind, op.params["name"], op.requested_by) == (
        OperationKind.CAPTURE,
        "prepared",
        ines,
    )
    assert sent == [op.pk]


def test_tas_students_and_other_courses_staff_may_not_capture(
    make_vm, group_a, tara, alice, olga, otto, sent
):
    vm = make_vm(group_a)
    for who in (tara, alice, olga, otto):
        with pytest.raises(NotAllowed):
            images.vm_capture_request(vm=vm, name="prepared", by=who)
    assert not Operation.objects.exists()


def test_a_paused_vm_or_a_taken_name_is_refused(make_vm, group_a, ines, sent):
    vm = make_vm(group_a, observed_state=ObservedState.PAUSED)
    with pytest.raises(Refused, match="is paused"):
        images.vm_capture_request(vm=vm, name="prepared", by=ines)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    with pytest.raises(Refused, match="An image named deb exists already"):
        images.vm_capture_request(vm=vm, name="deb", by=ines)


def test_the_capture_executor_registers_the_image_and_its_copy_on_the_vms_host(
    make_vm, group_a, ines, sent, store, upload, hosts, monkeypatch
):
    vm = make_vm(group_a)
    op = images.vm_capture_request(vm=vm, name="prepared", by=ines)

    class Capturing:
        def image_capture(self, spec, dest, *, compress, progress=None):
            shutil.copy(upload, dest)  # a real standalone qcow2, as the driver leaves it
            return {"total_s": 2.0, "frozen_s": 0.5}

        def resolve_virt_type(self, requested):
            return "qemu"

    monkeypatch.setattr(images, "driver_of", lambda vm: Capturing())
    monkeypatch.setattr(images.executors, "driver_of", lambda vm: Capturing())
    images.vm_capture(Operation.objects.get(pk=op.pk))
    image = Image.objects.get(name="prepared")
    assert (image.course, image.source, image.captured_from, image.created_by) == (
        group_a.course, ImageSource.CAPTURED, vm, ines)  # fmt: skip
    assert image.sha256 == hashlib.sha256(Path(image.path).read_bytes()).hexdigest()
    assert [(c.host.name, c.state) for c in image.copies.all()] == [("h1", "present")]
    assert Operation.objects.get(pk=op.pk).progress == "image prepared is on 1 host(s)"
    assert sorted(p.name for p in store.iterdir()) == ["prepared.qcow2"]
    # Run again (a worker that died after registering): kept, only the copies checked.
    images.vm_capture(Operation.objects.get(pk=op.pk))
    assert Image.objects.filter(name="prepared").count() == 1


def test_an_image_larger_than_the_templates_disk_is_refused(template, imported, ines, hosts):
    image_distribute(image=imported.image)
    Image.objects.filter(pk=imported.image.pk).update(virtual_size=20 * 2**30)
    imported.image.refresh_from_db()
    with pytest.raises(Refused, match="20.0 GiB, more than the template's 10 GiB disk"):
        images.template_image_set(template=template, image=imported.image, by=ines)


def test_a_drain_moves_a_vm_only_to_a_host_holding_its_image(
    imported, make_vm, group_a, h1, h2, hosts
):
    image_distribute(image=imported.image, hosts=Host.objects.filter(name="h1"))
    vm = make_vm(group_a, image=imported.image)
    assert placement.move_destination(vm=vm, away_from=h1) is None
    image_distribute(image=imported.image)
    assert placement.move_destination(vm=vm, away_from=h1) == h2
