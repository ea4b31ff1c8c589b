"""Block volumes: a group's data disks, each a standalone qcow2 on one host.

A volume belongs to its group, lives on one host (the host of the VM it was made for,
and where it went with that VM on a cold move) and is attached to at most one VM at a
time. The guest finds it by its serial (``/dev/disk/by-id/virtio-<serial>``): the
target name libvirt is given (vdb, vdc, ...) is only a hint (LIBVIRT-NOTES).
"""

import secrets

from django.conf import settings
from django.db import models

from labs.choices import VolumeState
from labs.models.courses import Group
from labs.models.hosts import Host
from labs.models.vms import Vm

VOLUME_NAME_MAX = 40
VOLUME_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
# virtio-blk carries at most 20 bytes of serial (VIRTIO_BLK_ID_BYTES).
SERIAL_MAX = 20


def new_serial() -> str:
    """``sv-`` and 16 hex digits: 19 bytes, unique, never derived from free text."""
    return f"sv-{secrets.token_hex(8)}"


class Volume(models.Model):
    group = models.ForeignKey(Group, on_delete=models.PROTECT, related_name="volumes")
    name = models.CharField(max_length=VOLUME_NAME_MAX)
    size_gib = models.PositiveIntegerField("size (GiB)")
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="volumes")
    vm = models.ForeignKey(
        Vm,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="volumes",
        help_text="The VM it is attached to; empty: detached.",
    )
    serial = models.CharField(max_length=SERIAL_MAX, unique=True, default=new_serial)
    state = models.CharField(
        max_length=10, choices=VolumeState.choices, default=VolumeState.CREATING
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["group", "name"],
                name="volume_name_unique_per_group",
                violation_error_message="The group already has a volume with this name.",
            ),
            models.CheckConstraint(
                condition=models.Q(size_gib__gte=1) & models.Q(size_gib__lte=2048),
                name="volume_size_range",
                violation_error_message="A volume is 1 to 2048 GiB.",
            ),
            models.CheckConstraint(
                condition=models.Q(name__regex=VOLUME_NAME_PATTERN),
                name="volume_name_slug",
                violation_error_message="A volume name uses a-z, 0-9 and '-'.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.group.name}/{self.name}"

    @property
    def file_name(self) -> str:
        """The qcow2's name in its host's storage directory: from the id, never free text
        (and never ``<domain>.qcow2`` or ``<domain>-seed.iso``, a VM's own files)."""
        return f"{settings.STRATUS_DOMAIN_PREFIX}volume-{self.pk}.qcow2"

    @property
    def guest_path(self) -> str:
        """Where the guest sees it, whatever name its kernel gave the disk."""
        return f"/dev/disk/by-id/virtio-{self.serial}"
