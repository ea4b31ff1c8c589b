"""Course images: an operator's import (checked before use), an instructor's capture of a
VM (the CAPTURE executor), the template switching to an image, and refusing to delete or
replace an image in use. Where copies are and how they travel: labs/compute/image_copies.py.
docs/storage.md says what each check is for and what was measured.
"""

import logging
import math
import os
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils.text import slugify

from labs import access
from labs.access import Action
from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    ImageCopyState,
    ImageSource,
    ObservedState,
    OperationKind,
)
from labs.compute import dispatch, executors
from labs.compute.image_copies import image_copy_to, image_distribute
from labs.compute.records import driver_of, operation_progress
from labs.drivers.base import HypervisorError
from labs.drivers.qcow2 import (
    GiB,
    ImageRefused,
    file_sha256,
    standalone_check,
    standalone_copy,
    upload_check,
)
from labs.errors import Invalid, NotAllowed, Refused
from labs.models import Course, Image, ImageCopy, Operation, Vm, VmTemplate

log = logging.getLogger(__name__)
S = ObservedState
NAME_MAX = Image._meta.get_field("name").max_length


def image_path(name: str) -> Path:
    """Where an image named ``name`` lives, the same path on every host."""
    return Path(settings.STRATUS_IMAGE_DIR) / f"{name}.qcow2"


def image_name_check(name: str) -> str:
    """``name`` as an image's name (a slug, free, no file of that name); Invalid/Refused."""
    if not name or slugify(name) != name or len(name) > NAME_MAX:
        raise Invalid(
            f"An image name is a slug (lower-case letters, digits, '-'), up to {NAME_MAX} "
            "characters."
        )
    if Image.objects.filter(name=name).exists():
        raise Refused(f"An image named {name} exists already: choose another name.")
    if os.path.lexists(image_path(name)):
        raise Refused(f"{image_path(name)} exists already: choose another name.")
    return name


def _publish(partial: Path, dest: Path, **fields) -> Image:
    """The finished file linked into place and its row written, both or neither."""
    partial.chmod(0o444)  # a base image is only ever a read-only backing file
    with transaction.atomic():
        image = Image.objects.create(path=str(dest), **fields)
        os.link(partial, dest)  # fails rather than replace a file someone else put there
    partial.unlink()
    return image


# --- import (manage.py import_image, the admin's import form) ---------------------------------


@dataclass
class Imported:
    image: Image
    check_seconds: float
    copy_seconds: float
    copies: list[ImageCopy] = field(default_factory=list)


def image_import(
    *,
    path: str,
    course: Course | None,
    name: str,
    os_name: str = "",
    login_user: str = "student",
    by: AbstractBaseUser | None = None,
    distribute: bool = True,
) -> Imported:
    """Check the qcow2 at ``path``, copy it into the image store and register it for
    ``course``. Refused naming the reason (and nothing left behind: no row, no file) for
    anything but a standalone qcow2 within the size limit that ``qemu-img check`` passes.
    Then copied to every host that is up (``distribute``)."""
    name = image_name_check(name)
    started = time.monotonic()
    try:
        info = upload_check(str(path), max_virtual_gib=settings.IMAGE_MAX_VIRTUAL_GIB)
    except ImageRefused as error:
        raise Refused(f"Image refused: {error}.") from None
    checked = time.monotonic()
    dest = image_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{name}.import.qcow2")
    with suppress(FileNotFoundError):
        partial.unlink()  # an interrupted import of the same name
    try:
        standalone_copy(str(path), str(partial))
        size = int(info["virtual-size"])
        image = _publish(
            partial,
            dest,
            name=name,
            os=os_name or f"imported from {Path(path).name}"[:100],
            login_user=login_user,
            size_gib=max(1, math.ceil(size / GiB)),
            sha256=file_sha256(str(partial)),
            course=course,
            source=ImageSource.IMPORTED,
            everywhere=False,
            virtual_size=size,
            created_by=by,
        )
    except ImageRefused as error:
        raise Refused(f"Image refused: {error}.") from None
    finally:
        with suppress(FileNotFoundError):
            partial.unlink()
    imported = Imported(image, checked - started, time.monotonic() - checked)
    if distribute:
        imported.copies = image_distribute(image=image)
    log.info("imported image %s from %s", name, path)
    return imported


# --- capture (the CAPTURE operation) -------------------------------------------------------------


def vm_capture_request(
    *, vm: Vm, name: str, by: AbstractBaseUser | None, os_name: str = ""
) -> Operation:
    """Ask for ``vm``'s disk to become the course image ``name``: the course's
    instructors and operators only; a running (frozen while read) or stopped VM."""
    vm = Vm.objects.select_related("host", "group__course", "image").get(pk=vm.pk)
    if by is not None and not access.may(by, Action.IMAGE, vm):
        raise NotAllowed("Only the course's instructors and operators capture VMs as images.")
    if vm.host_id is None or vm.observed_state == S.NEW:
        raise Refused(f"{vm.name} is not created yet.")
    if vm.observed_state not in (S.RUNNING, S.SHUTOFF):
        raise Refused(
            f"{vm.name} is {S(vm.observed_state).label.lower()}: a running VM (its file "
            "systems frozen while the disk is copied) or a stopped one can be captured."
        )
    name = image_name_check(name)
    taking = Operation.objects.filter(
        kind=OperationKind.CAPTURE, status__in=ACTIVE_OPERATION_STATUSES, params__name=name
    )
    if taking.exists():
        raise Refused(f"A capture named {name} is on its way already.")
    params = {"name": name, "os": os_name or vm.image.os}
    return dispatch.operation_create(vm=vm, kind=OperationKind.CAPTURE, by=by, params=params)


def vm_capture(op: Operation) -> None:
    """The executor: the disk flattened and sealed by the VM's host's worker into the image
    store, checked, checksummed and registered for the course, then copied to the other
    hosts. Re-run after a crash, an image this operation registered is kept and only its
    copies are made again."""
    vm = Vm.objects.select_related("group__course", "host", "image").get(pk=op.vm_id)
    name, report = op.params["name"], operation_progress(op)
    image = Image.objects.filter(name=name).first()
    if image is not None and image.captured_from_id != vm.pk:
        raise HypervisorError(f"an image named {name} exists already; not captured")
    if image is None:
        dest = image_path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{name}.capture.qcow2")
        with suppress(FileNotFoundError):
            partial.unlink()
        try:
            timings = driver_of(vm).image_capture(
                executors.vm_spec(vm),
                str(partial),
                compress=settings.IMAGE_CAPTURE_COMPRESS,
                progress=report,
            )
            report("checking the captured image")
            info = standalone_check(str(partial))
            size = int(info["virtual-size"])
            image = _publish(
                partial,
                dest,
                name=name,
                os=str(op.params.get("os") or vm.image.os)[:100],
                login_user=vm.image.login_user,
                size_gib=max(1, math.ceil(size / GiB)),
                sha256=file_sha256(str(partial)),
                course=vm.group.course,
                source=ImageSource.CAPTURED,
                everywhere=False,
                virtual_size=size,
                captured_from=vm,
                created_by=op.requested_by,
            )
        finally:
            with suppress(FileNotFoundError):
                partial.unlink()
        frozen = ""
        if "frozen_s" in timings:
            frozen = f", file systems frozen {timings['frozen_s']:.1f} s"
        report(
            f"captured {name} in {timings['total_s']:.1f} s{frozen}, "
            f"{dest.stat().st_size / 2**20:.0f} MiB"
        )
    report(f"checking the copy on {vm.host.name}")
    here = image_copy_to(image=image, host=vm.host)
    if here.error:
        raise HypervisorError(f"the captured image is not usable on {vm.host.name}: {here.error}")
    elsewhere = image_distribute(image=image)
    failed = [f"{c.host.name} ({c.error})" for c in elsewhere if c.error]
    hosts = 1 + len(elsewhere) - len(failed)
    report(
        f"image {name} is on {hosts} host(s)"
        + (f"; not copied to {', '.join(failed)}: manage.py distribute_image" if failed else "")
    )


# --- the template's image, deleting and replacing ------------------------------------------------


def template_image_set(*, template: VmTemplate, image: Image, by: AbstractBaseUser | None) -> None:
    """New VMs of the course, and each VM at its next reset, use ``image``; VMs keep their
    disk (and its backing file) until then. The course's instructors and operators only;
    an image of another course, or one no host holds yet, is refused."""
    course = template.course
    if by is not None and not access.is_course_staff(user=by, course=course, action=Action.IMAGE):
        raise NotAllowed("Only the course's instructors and operators change its image.")
    if image.course_id not in (None, course.pk):
        raise Refused(f"The image {image.name} belongs to another course.")
    if image.virtual_size > template.disk_gib * GiB:
        raise Refused(
            f"The image {image.name} is {image.virtual_size / GiB:.1f} GiB, more than the "
            f"template's {template.disk_gib} GiB disk: raise the disk size first."
        )
    present = ImageCopy.objects.filter(image=image, state=ImageCopyState.PRESENT)
    if not image.everywhere and not present.exists():
        raise Refused(
            f"No host holds the image {image.name} yet (manage.py distribute_image "
            f"{image.name}): VMs could not be placed."
        )
    VmTemplate.objects.filter(pk=template.pk).update(image=image)
    template.image = image


def image_in_use(image: Image) -> str:
    """Why ``image`` cannot be deleted or replaced ("" when it can)."""
    templates = list(VmTemplate.objects.filter(image=image).values_list("course__slug", flat=True))
    if templates:
        return f"the template of {', '.join(templates)} uses it"
    vms = Vm.objects.live().filter(image=image).count()
    if vms:
        return f"{vms} VM(s) have their disk on it"
    return ""


def image_delete(*, image: Image) -> None:
    """Delete an image no template and no live VM uses (its copies' rows and this
    machine's file with it); Refused naming what uses it. Files on other hosts stay for
    the operator to remove (docs/storage.md)."""
    why = image_in_use(image)
    if why:
        raise Refused(f"The image {image.name} is in use: {why}.")
    if Vm.objects.filter(image=image).exists():
        raise Refused(
            f"The image {image.name} is named by deleted VMs' records (the audit trail): "
            "it stays registered."
        )
    path = image.path
    image.delete()
    if image.source != ImageSource.BUILT:
        with suppress(FileNotFoundError):
            os.unlink(path)
