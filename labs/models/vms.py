import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from labs.choices import (
    DesiredState,
    ObservedState,
)
from labs.models.courses import Group
from labs.models.hosts import Host, Image


class VmQuerySet(models.QuerySet):
    def live(self) -> "VmQuerySet":
        """VMs that are not deleted (a deleted VM keeps its row for the audit trail)."""
        return self.exclude(desired_state=DesiredState.DELETED)


class Vm(models.Model):
    group = models.ForeignKey(Group, on_delete=models.PROTECT, related_name="vms")
    name = models.CharField(max_length=40)
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.PROTECT, related_name="vms"
    )
    image = models.ForeignKey(Image, on_delete=models.PROTECT)
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_gib = models.PositiveIntegerField()
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    instance_id = models.CharField(max_length=64, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    desired_state = models.CharField(
        max_length=8, choices=DesiredState.choices, default=DesiredState.RUNNING
    )
    observed_state = models.CharField(
        max_length=8, choices=ObservedState.choices, default=ObservedState.NEW
    )
    observed_at = models.DateTimeField(null=True, blank=True)
    status_message = models.CharField(max_length=300, blank=True)
    # Where the running VM's VNC server listens, as its worker last saw it (loopback TCP
    # on the host, or a unix socket); empty when it is not running.
    vnc_host = models.CharField(max_length=255, blank=True)
    vnc_port = models.PositiveIntegerField(null=True, blank=True)
    vnc_socket = models.CharField(max_length=300, blank=True)
    # The desktop name that VNC server announces: the console proxy checks it.
    vnc_name = models.CharField(max_length=300, blank=True)
    # SSH access inside the guest (labs/compute/ssh_access.py): every account and key
    # Stratus has given on this disk since its last reset (so a revert to an older
    # snapshot cannot bring one back unnoticed), when the members or key last changed,
    # and when the guest last got them (the seed, or the guest agent).
    ssh_accounts = models.JSONField(default=list, blank=True)
    ssh_keys = models.JSONField(default=list, blank=True)
    ssh_wanted_at = models.DateTimeField(null=True, blank=True)
    ssh_synced_at = models.DateTimeField(null=True, blank=True)
    # Shared files (labs/compute/shares.py): its domain has the group and course shares
    # (set from the course at provision and reset): no live move, no suspend to disk.
    shares = models.BooleanField(default=False, editable=False)
    # Idle detection (labs/compute/idle.py): the last CPU sample and when use stopped.
    cpu_time_ns = models.BigIntegerField(null=True, blank=True)
    cpu_sampled_at = models.DateTimeField(null=True, blank=True)
    idle_since = models.DateTimeField(null=True, blank=True)
    keep_running_until = models.DateTimeField(null=True, blank=True)
    # Its NIC on the group's private network (labs/compute/networks.py): the MAC and the
    # address the group's DHCP gives it (None once the VM is deleted: the address is free).
    group_mac = models.CharField("group network MAC", max_length=17, blank=True)
    group_ip = models.GenericIPAddressField("group network address", null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = VmQuerySet.as_manager()

    class Meta:
        ordering = ["group", "name"]
        verbose_name = "VM"
        constraints = [
            models.UniqueConstraint(
                fields=["group", "name"],
                name="vm_name_unique_per_group",
                violation_error_message="The group already has a VM with this name.",
            ),
            models.UniqueConstraint(
                fields=["group_ip"],
                condition=models.Q(group_ip__isnull=False),
                name="vm_group_ip_unique",
                violation_error_message="This group network address is taken.",
            ),
            models.UniqueConstraint(
                fields=["group_mac"],
                condition=~models.Q(group_mac=""),
                name="vm_group_mac_unique",
                violation_error_message="This group network MAC is taken.",
            ),
            models.UniqueConstraint(
                fields=["host", "ssh_port"],
                name="vm_ssh_port_unique_per_host",
                violation_error_message="This SSH port is taken on the host.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.group.name}/{self.name}"

    @property
    def domain_name(self) -> str:
        """The libvirt name: derived from the id, so free text never reaches libvirt names."""
        return f"{settings.STRATUS_DOMAIN_PREFIX}{self.pk}"

    @property
    def ssh_sync_due(self) -> bool:
        """The members or the key changed since the guest last got them."""
        return self.ssh_wanted_at is not None and (
            self.ssh_synced_at is None or self.ssh_synced_at < self.ssh_wanted_at
        )

    @property
    def unknown_since(self):
        """When a VM whose host did not answer became unknown, or None for any other state.

        The host's ``unreachable_since`` (reconcile keeps the first pass that failed, where
        the VM's ``observed_at`` moves on with every pass); the VM's ``observed_at`` when its
        host has not been marked unreachable (an operation gave up on it first).
        """
        if self.observed_state != ObservedState.UNKNOWN:
            return None
        host = self.host
        return (host.unreachable_since if host is not None else None) or self.observed_at

    @property
    def group_network_label(self) -> str:
        """ "vm2 · 10.200.3.17": the name the group's other VMs resolve and its address on
        the group's private network; "" when it has none (its host has no group networks)."""
        if not (self.group_ip and self.host and self.host.group_networks):
            return ""
        return f"{self.name} · {self.group_ip}"

    @property
    def ssh_command(self) -> str:
        if not (self.host and self.ssh_port):
            return ""
        return f"ssh -p {self.ssh_port} {self.image.login_user}@{self.host.ssh_address}"


class Snapshot(models.Model):
    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=60)
    with_memory = models.BooleanField()
    final = models.BooleanField(
        default=False, help_text="The deadline's snapshot: kept, and only staff may delete it."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The block volumes attached when it was taken ({"id", "name", "serial"} each): libvirt
    # snapshots every qcow2 disk of the domain, so their contents are in it too.
    volumes = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["vm", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["vm", "name"],
                name="snapshot_name_unique_per_vm",
                violation_error_message="This VM already has a snapshot with this name.",
            )
        ]

    def __str__(self) -> str:
        return self.name


class ConsoleSession(models.Model):
    """One browser console connection: who watched or drove which VM, when, how much."""

    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="console_sessions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    view_only = models.BooleanField(default=False)
    started_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    bytes_to_vm = models.BigIntegerField(default=0)
    bytes_from_vm = models.BigIntegerField(default=0)
    close_reason = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"console {self.vm} by {self.user} at {self.started_at:%Y-%m-%d %H:%M}"


class StateChange(models.Model):
    """The observed state history of a VM: a row each time the state a host reports
    changes. Usage hours are the stretches between a RUNNING row and the next row."""

    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="state_changes")
    state = models.CharField(max_length=16, choices=ObservedState.choices)
    at = models.DateTimeField(default=timezone.now)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="For a RUNNING row: who asked for the operation that started it.",
    )

    class Meta:
        ordering = ["vm", "at", "pk"]
        indexes = [models.Index(fields=["vm", "at"], name="state_change_vm_at")]

    def __str__(self) -> str:
        return f"{self.vm} {self.state} at {self.at:%Y-%m-%d %H:%M:%S}"


class VmArchive(models.Model):
    """A VM's final disk, exported at the end of term (labs/compute/term.py): a compressed
    standalone qcow2 and a manifest beside it, restorable by ``restore_archive``."""

    vm = models.ForeignKey(Vm, on_delete=models.PROTECT, related_name="archives")
    path = models.CharField(max_length=500, help_text="The qcow2 file on the archive disk.")
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    manifest = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)
    restored_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"archive of {self.vm} ({self.created_at:%Y-%m-%d})"
