"""Published ports: a guest TCP port of a VM forwarded from a port of its host's address.

A publication belongs to one VM and holds one port of its host's published range
(``Host.published_port_min``-``max``); the database makes a host port one publication's
(``publication_port_unique_per_host``), so two groups can never get the same one, and a
VM publishes a guest port once. The row is the truth: the domain's definition and its
running QEMU are brought to it by the worker (labs/compute/ports.py, the driver's
``ports_apply``). It goes when it is unpublished, and with its VM (deleted or archived).
Whether it answers is the VM's business too: while the VM is not running nothing
listens, and the page says so (``is_open``).
"""

from django.conf import settings
from django.db import models

from labs.choices import ObservedState, PortState
from labs.models.hosts import Host
from labs.models.vms import Vm


class Publication(models.Model):
    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="publications")
    # The VM's host, kept here so that the database can hold a host port to one row; moved
    # with the VM (labs/compute/moves.py gives it a port of the destination's range).
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="publications")
    host_port = models.PositiveIntegerField()
    guest_port = models.PositiveIntegerField()
    state = models.CharField(max_length=10, choices=PortState.choices, default=PortState.OPENING)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["vm", "guest_port"]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "host_port"],
                name="publication_port_unique_per_host",
                violation_error_message="This port is published already on the host.",
            ),
            models.UniqueConstraint(
                fields=["vm", "guest_port"],
                name="publication_guest_port_unique_per_vm",
                violation_error_message="This guest port of the VM is published already.",
            ),
            models.CheckConstraint(
                condition=models.Q(guest_port__gte=1) & models.Q(guest_port__lte=65535),
                name="publication_guest_port_range",
                violation_error_message="A guest port is 1 to 65535.",
            ),
            models.CheckConstraint(
                condition=models.Q(host_port__gte=1024) & models.Q(host_port__lte=65535),
                name="publication_host_port_range",
                violation_error_message="A host port is 1024 to 65535.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.vm} :{self.guest_port} on {self.host.name}:{self.host_port}"

    @property
    def address(self) -> str:
        """``host:port`` where the published port is reached (the SSH forwards' address)."""
        return f"{self.host.ssh_address}:{self.host_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    @property
    def is_open(self) -> bool:
        """Forwarded and listened for: published, and its VM running (a stopped VM's QEMU
        is gone, and the forward with it, until the VM starts again)."""
        return (
            self.state == PortState.PUBLISHED and self.vm.observed_state == ObservedState.RUNNING
        )
