"""Where each course image is: one row per (image, host) that Stratus copied it to.

A built image (``Image.everywhere``) has no rows: the operator keeps it on every host. An
imported or captured image is present on a host only once its copy there was written and
its checksum read back (labs/compute/images.py); placement and resets use only such hosts.
"""

from django.db import models

from labs.choices import ImageCopyState
from labs.models.hosts import Host, Image


class ImageCopy(models.Model):
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="copies")
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="image_copies")
    state = models.CharField(
        max_length=8, choices=ImageCopyState.choices, default=ImageCopyState.COPYING
    )
    error = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["image", "host"]
        verbose_name_plural = "image copies"
        constraints = [
            models.UniqueConstraint(
                fields=["image", "host"],
                name="one_copy_per_image_and_host",
                violation_error_message="This host has a copy of the image already.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.image} on {self.host} ({self.state})"
