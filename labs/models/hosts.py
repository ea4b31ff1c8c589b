from django.conf import settings
from django.db import models
from django.utils import timezone

from labs.choices import (
    DriverKind,
    HostState,
    ImageSource,
    NetworkMode,
    VirtType,
)
from labs.models.courses import Course
from labs.validators import LIBVIRT_URI_HELP, validate_libvirt_uri


class Host(models.Model):
    """A hypervisor host. Its worker consumes the Celery queue ``host.<name>``."""

    name = models.SlugField(max_length=40, unique=True)
    driver = models.CharField(
        max_length=16,
        choices=DriverKind.choices,
        default=DriverKind.LIBVIRT,
        help_text="Which driver talks to this host (labs/drivers/registry.py).",
    )
    uri = models.CharField(
        "libvirt URI",
        max_length=300,
        help_text=LIBVIRT_URI_HELP,
        validators=[validate_libvirt_uri],
    )
    enabled = models.BooleanField(default=True, help_text="New VMs are placed on enabled hosts.")
    draining = models.BooleanField(
        default=False, help_text="Being emptied: no new VMs; its VMs move off."
    )
    vcpus = models.PositiveIntegerField("vCPUs")
    memory_mib = models.PositiveIntegerField("memory (MiB)")
    disk_gib = models.PositiveIntegerField("disk (GiB)")
    cpu_overcommit = models.DecimalField(max_digits=4, decimal_places=2, default=4)
    memory_overcommit = models.DecimalField(max_digits=4, decimal_places=2, default=1)
    disk_overcommit = models.DecimalField(max_digits=4, decimal_places=2, default=2)
    virt_type = models.CharField(max_length=8, choices=VirtType.choices, default=VirtType.AUTO)
    network_mode = models.CharField(
        max_length=8, choices=NetworkMode.choices, default=NetworkMode.USER
    )
    bridge = models.CharField(max_length=15, blank=True, help_text="Bridge mode: the bridge.")
    ssh_address = models.CharField(
        "SSH address",
        max_length=255,
        default="127.0.0.1",
        help_text="The address students SSH to; user-mode forwards listen on its loopback.",
    )
    ssh_port_min = models.PositiveIntegerField(default=22000)
    ssh_port_max = models.PositiveIntegerField(default=22999)
    # Published ports (labs/compute/ports.py): guest ports members publish are forwarded from
    # this range, on the same address as the SSH forwards (shown with ``ssh_address``).
    published_port_min = models.PositiveIntegerField(default=23000)
    published_port_max = models.PositiveIntegerField(default=23999)
    storage_dir = models.CharField(
        max_length=300, default="/var/lib/stratus/vms", help_text="Overlays and seeds."
    )
    console_ssh = models.CharField(
        "console SSH",
        max_length=255,
        blank=True,
        help_text="user@host[:port] the web process opens console channels through (SSH to "
        "the VMs' VNC sockets on this host); empty: this web host's own sockets.",
    )
    console_ssh_host_key = models.TextField(
        "console SSH host key",
        blank=True,
        help_text="The host's SSH public key (one line, 'ssh-ed25519 AAAA…'), pinned: a "
        "server without it is refused.",
    )
    # Group networks (labs/compute/networks.py, docs/networking.md): off unless the
    # operator turns them on for the host, so a host that is also someone's desktop (the
    # demo, the tests' own libvirtd) never gets a bridge.
    group_networks = models.BooleanField(
        default=False,
        help_text="Give this host's VMs a second NIC on their group's private network "
        "(a libvirt network per group, VXLAN to the group's other hosts).",
    )
    tunnel_address = models.GenericIPAddressField(
        "tunnel address",
        null=True,
        blank=True,
        help_text="The underlay address other hosts send this host's VXLAN traffic to.",
    )
    vxlan_port = models.PositiveIntegerField(
        "VXLAN UDP port", default=4789, help_text="The UDP port this host's VXLAN devices use."
    )
    netns = models.CharField(
        "network namespace",
        max_length=64,
        blank=True,
        help_text="The network namespace the host's libvirtd runs in, as `ip netns` names "
        "it; empty (production): the worker's own.",
    )
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # Set by reconcile when the host first fails to answer, cleared when it answers again.
    unreachable_since = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ssh_port_min__gte=1024)
                & models.Q(ssh_port_max__lte=65535)
                & models.Q(ssh_port_max__gte=models.F("ssh_port_min")),
                name="host_ssh_port_range",
                violation_error_message="SSH ports are a range within 1024-65535.",
            ),
            models.CheckConstraint(
                condition=models.Q(published_port_min__gte=1024)
                & models.Q(published_port_max__lte=65535)
                & models.Q(published_port_max__gte=models.F("published_port_min"))
                & (
                    models.Q(published_port_min__gt=models.F("ssh_port_max"))
                    | models.Q(published_port_max__lt=models.F("ssh_port_min"))
                ),
                name="host_published_port_range",
                violation_error_message="Published ports are a range within 1024-65535, apart "
                "from the SSH ports.",
            ),
            models.CheckConstraint(
                condition=models.Q(vxlan_port__gte=1) & models.Q(vxlan_port__lte=65535),
                name="host_vxlan_port_range",
                violation_error_message="The VXLAN port is a UDP port, 1-65535.",
            ),
            models.CheckConstraint(
                condition=~models.Q(network_mode=NetworkMode.BRIDGE) | ~models.Q(bridge=""),
                name="host_bridge_named",
                violation_error_message="Bridge mode needs the bridge's name.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"host.{self.name}"

    @property
    def state(self) -> str:
        """A HostState: disabled, draining, unreachable or up, the first that applies.

        Only an ``up`` host gets new VMs (compute.placement.vm_place).
        """
        if not self.enabled:
            return HostState.DISABLED
        if self.draining:
            return HostState.DRAINING
        if self.unreachable_since is not None:
            return HostState.UNREACHABLE
        return HostState.UP

    @property
    def state_label(self) -> str:
        """The state for people: "up", "draining", "unreachable since 14:03" (local time;
        with the date when it was not today)."""
        state = self.state
        if state != HostState.UNREACHABLE:
            return state.label.lower()
        return f"unreachable since {clock(self.unreachable_since)}"


def clock(moment) -> str:
    """A moment for people, in the current time zone: "14:03" today, "Dec 5, 14:03" on
    another day. Host states and VMs whose host did not answer say "since" with it."""
    local = timezone.localtime(moment)
    if local.date() == timezone.localdate():
        return f"{local:%H:%M}"
    return f"{local:%b} {local.day}, {local:%H:%M}"


class Image(models.Model):
    """A read-only base disk image, at the same path on every host that holds it.

    A built image (``build_image``) is put on every host by the operator (``everywhere``);
    an imported or captured one (labs/compute/images.py) is copied by Stratus, and each
    host's copy is an ImageCopy row: placement uses only hosts whose copy is present.
    """

    name = models.SlugField(max_length=60, unique=True)
    os = models.CharField("OS", max_length=100)
    login_user = models.CharField(max_length=32, default="student")
    path = models.CharField(max_length=300, help_text="Absolute path of the qcow2 on each host.")
    size_gib = models.PositiveIntegerField("virtual size (GiB)", default=3)
    sha256 = models.CharField(max_length=64, blank=True)
    course = models.ForeignKey(
        Course,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="images",
        help_text="The course it was made for; empty: any course may use it.",
    )
    source = models.CharField(
        max_length=10, choices=ImageSource.choices, default=ImageSource.BUILT
    )
    everywhere = models.BooleanField(
        default=True,
        help_text="The operator keeps this file on every host; otherwise Stratus copies it "
        "and tracks each host's copy.",
    )
    virtual_size = models.BigIntegerField("virtual size (bytes)", default=0)
    captured_from = models.ForeignKey(
        "labs.Vm", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class VmTemplate(models.Model):
    """What an approved group of a course gets, and how far it may grow."""

    course = models.OneToOneField(Course, on_delete=models.CASCADE, related_name="vm_template")
    image = models.ForeignKey(Image, on_delete=models.PROTECT)
    count = models.PositiveSmallIntegerField("VMs per group at approval", default=1)
    vcpus = models.PositiveSmallIntegerField("vCPUs", default=1)
    memory_mib = models.PositiveIntegerField("memory (MiB)", default=1024)
    disk_gib = models.PositiveIntegerField("disk (GiB)", default=10)
    quota_vms = models.PositiveSmallIntegerField(default=2)
    quota_vcpus = models.PositiveSmallIntegerField(default=4)
    quota_memory_mib = models.PositiveIntegerField(default=4096)
    quota_disk_gib = models.PositiveIntegerField(default=40)

    def __str__(self) -> str:
        return f"VM template of {self.course.slug}"
