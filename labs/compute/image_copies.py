"""Which hosts hold a course image, and getting it onto those that do not.

A built image (``Image.everywhere``) is the operator's to put on every host; an imported
or captured one is copied by Stratus: from the machine that holds the file (the importing
command's, or the capturing host's worker) into a volume at the same path on each host,
through the host's libvirt, then read back and checksummed. Only a host whose copy is
``present`` (checksum verified) is chosen by placement, and a reset onto the template's
new image needs its host to hold it. A copy that failed says why and is tried again by
``manage.py distribute_image``. docs/storage.md, "Distribution".
"""

import logging
import os

from django.db.models import Exists, OuterRef, Q

from labs.choices import ImageCopyState
from labs.drivers.base import HypervisorError
from labs.drivers.qcow2 import file_sha256
from labs.drivers.registry import driver_for
from labs.models import Host, Image, ImageCopy

log = logging.getLogger(__name__)

UP = Q(enabled=True, draining=False, unreachable_since__isnull=True)


def hosts_holding(image: Image) -> Q:
    """The hosts (a Q on Host) where ``image`` may be used now."""
    if image.everywhere:
        return Q()
    return Q(
        pk__in=ImageCopy.objects.filter(image=image, state=ImageCopyState.PRESENT).values(
            "host_id"
        )
    )


def holds_image(image_id: int) -> dict:
    """Annotations for a Host query (one query, however many hosts): ``image_everywhere``
    (the image is the operator's, on every host) and ``image_copied`` (this host's copy is
    present)."""
    return {
        "image_everywhere": Exists(Image.objects.filter(pk=image_id, everywhere=True)),
        "image_copied": Exists(
            ImageCopy.objects.filter(
                image_id=image_id, host=OuterRef("pk"), state=ImageCopyState.PRESENT
            )
        ),
    }


def image_on(*, image: Image, host: Host) -> bool:
    return Host.objects.filter(hosts_holding(image), pk=host.pk).exists()


def _say(text: str) -> str:
    limit = ImageCopy._meta.get_field("error").max_length
    return text if len(text) <= limit else text[: limit - 1] + "…"


def image_copy_to(*, image: Image, host: Host) -> ImageCopy:
    """Make ``host`` hold ``image`` (copied from this machine's file if it lacks it) and
    record the outcome: present when the host's file has the recorded checksum, failed
    (with why) otherwise. A different file at the path on the host is never replaced."""
    copy, _ = ImageCopy.objects.get_or_create(image=image, host=host)
    ImageCopy.objects.filter(pk=copy.pk).update(state=ImageCopyState.COPYING, error="")
    driver = driver_for(host)
    try:
        found = driver.image_digest(image.path)
        if found is None:
            if not os.path.isfile(image.path):
                raise HypervisorError(f"{image.path} is not on this machine to copy from")
            if file_sha256(image.path) != image.sha256:
                raise HypervisorError(f"{image.path} here does not match its checksum")
            driver.image_put(image.path, image.path)
            found = driver.image_digest(image.path)
        if found != image.sha256:
            raise HypervisorError(
                f"the file at {image.path} on {host.name} is not this image (its sha256 is "
                f"{(found or 'unreadable')[:16]}…); remove it or import under another name"
            )
    except HypervisorError as error:
        log.warning("image %s not copied to %s: %s", image.name, host.name, error)
        ImageCopy.objects.filter(pk=copy.pk).update(
            state=ImageCopyState.FAILED, error=_say(str(error))
        )
    else:
        ImageCopy.objects.filter(pk=copy.pk).update(state=ImageCopyState.PRESENT, error="")
    copy.refresh_from_db()
    return copy


def image_distribute(*, image: Image, hosts=None) -> list[ImageCopy]:
    """Copy ``image`` to every host that is up (or to ``hosts``) and lacks a present
    copy; returns every copy tried, each present or failed with its reason."""
    if image.everywhere:
        return []
    hosts = Host.objects.filter(UP) if hosts is None else hosts
    have = ImageCopy.objects.filter(image=image, state=ImageCopyState.PRESENT).values("host_id")
    return [
        image_copy_to(image=image, host=host)
        for host in hosts.exclude(pk__in=have).order_by("name")
    ]


def image_for_reset(vm) -> Image:
    """The image a reset of ``vm`` rebuilds on: its course template's current image (a
    template switched to a new image takes each VM along at its next reset), recorded on
    the VM. HypervisorError, the VM left as it is, when its host does not hold it yet."""
    template = getattr(vm.group.course, "vm_template", None)
    image = template.image if template is not None else vm.image
    if image.pk == vm.image_id:
        return vm.image
    if not image_on(image=image, host=vm.host):
        raise HypervisorError(
            f"the course's image {image.name} is not on host {vm.host.name} yet "
            f"(manage.py distribute_image {image.name}); the VM was not reset"
        )
    type(vm).objects.filter(pk=vm.pk).update(image=image)
    vm.image = image
    return image
