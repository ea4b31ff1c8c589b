import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    STAFF_ROLES,
    ClockAfter,
    ClockPhase,
    DesiredState,
    DriverKind,
    GroupStatus,
    HostState,
    NetworkMode,
    ObservedState,
    OperationKind,
    OperationStatus,
    PlacementPolicy,
    Role,
    VirtType,
    Weekday,
)
from labs.validators import LIBVIRT_URI_HELP, one_line_text, time_zone_name, validate_libvirt_uri


def _default_time_zone() -> str:
    return settings.TIME_ZONE


class Course(models.Model):
    slug = models.SlugField(max_length=50, unique=True)
    title = models.CharField(max_length=200)
    term = models.CharField(max_length=50, blank=True)
    signup_opens_at = models.DateTimeField(
        null=True, blank=True, help_text="Empty: signup is open from the start."
    )
    signup_closes_at = models.DateTimeField(
        null=True, blank=True, help_text="Empty: signup never closes."
    )
    max_group_size = models.PositiveSmallIntegerField(default=4)
    snapshot_limit = models.PositiveSmallIntegerField(
        "snapshots per VM", default=10, help_text="The most snapshots one VM may keep."
    )
    # How far an instructor may raise one group's quotas (superusers set these).
    quota_cap_vms = models.PositiveSmallIntegerField("VMs cap", default=10)
    quota_cap_vcpus = models.PositiveSmallIntegerField("vCPUs cap", default=16)
    quota_cap_memory_mib = models.PositiveIntegerField("memory cap (MiB)", default=32768)
    quota_cap_disk_gib = models.PositiveIntegerField("disk cap (GiB)", default=200)
    placement = models.CharField(
        "placement policy",
        max_length=8,
        choices=PlacementPolicy.choices,
        default=PlacementPolicy.SPREAD,
        help_text="How new VMs choose among the hosts with room; a group's VMs stay together "
        "on one host while it has room (docs/decisions.md, Hosts and placement).",
    )
    # The course clock (labs/compute/clock.py, docs/course-clock.md).
    time_zone = models.CharField(
        max_length=64,
        default=_default_time_zone,
        validators=[time_zone_name],
        help_text="The IANA time zone the class schedule is written in (Europe/Berlin).",
    )
    clock_lead_minutes = models.PositiveSmallIntegerField(
        "ready at start: lead (minutes)",
        default=10,
        help_text="How long before a class its VMs are started or resumed.",
    )
    clock_after = models.CharField(
        "after class",
        max_length=8,
        choices=ClockAfter.choices,
        default=ClockAfter.SUSPEND,
        help_text="What happens to running VMs when a class ends (unless a member is in "
        "the VM's console).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(max_group_size__gte=1) & models.Q(max_group_size__lte=50),
                name="course_group_size_range",
                violation_error_message="A group has between 1 and 50 members.",
            ),
            models.CheckConstraint(
                condition=models.Q(signup_opens_at__isnull=True)
                | models.Q(signup_closes_at__isnull=True)
                | models.Q(signup_closes_at__gt=models.F("signup_opens_at")),
                name="course_signup_window_order",
                violation_error_message="Signup must close after it opens.",
            ),
            models.CheckConstraint(
                condition=models.Q(clock_lead_minutes__lte=240),
                name="course_clock_lead_range",
                violation_error_message="VMs start at most 240 minutes before a class.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.slug}: {self.title}"

    @property
    def is_signup_open(self) -> bool:
        now = timezone.now()
        if self.signup_opens_at and now < self.signup_opens_at:
            return False
        return not (self.signup_closes_at and now >= self.signup_closes_at)


class Group(models.Model):
    """A project group of one course: members, an idea and one SSH public key."""

    course = models.ForeignKey(Course, on_delete=models.CASCADE, related_name="groups")
    name = models.CharField(max_length=80, validators=[one_line_text])
    project_title = models.CharField(max_length=200, validators=[one_line_text])
    project_idea = models.TextField(max_length=5000)
    ssh_public_key = models.TextField(help_text="One OpenSSH public key line.")
    ssh_key_type = models.CharField(max_length=64)
    ssh_key_bits = models.PositiveIntegerField()
    ssh_key_fingerprint = models.CharField(max_length=100)
    # When the key was last replaced and a member last left the approved group: a member
    # who left may still hold the private key, so the page asks for a new one until then.
    ssh_key_changed_at = models.DateTimeField(null=True, blank=True)
    member_left_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=GroupStatus.choices, default=GroupStatus.PENDING
    )
    review_note = models.TextField(blank=True, max_length=5000)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Quota overrides an instructor can raise for one group; empty = the course template's.
    quota_vms = models.PositiveSmallIntegerField(null=True, blank=True)
    quota_vcpus = models.PositiveSmallIntegerField(null=True, blank=True)
    quota_memory_mib = models.PositiveIntegerField(null=True, blank=True)
    quota_disk_gib = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["course", "name"]
        constraints = [
            models.UniqueConstraint(
                Lower("name"),
                "course",
                name="group_name_unique_per_course",
                violation_error_message="A group with this name already exists in the course.",
            ),
            models.UniqueConstraint(
                fields=["course", "ssh_key_fingerprint"],
                name="group_key_unique_per_course",
                violation_error_message="Another group of this course already uses this key.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_editable(self) -> bool:
        return self.status != GroupStatus.APPROVED

    @property
    def key_replacement_advised(self) -> bool:
        """A member left since the key was last replaced: they may hold its private key."""
        return self.member_left_at is not None and (
            self.ssh_key_changed_at is None or self.ssh_key_changed_at < self.member_left_at
        )


class Membership(models.Model):
    """A user's place in a course, and (students) the one group they belong to there.

    One row per (course, user), so "one group per student per course" is held by the
    table's shape: a membership points at one group at most.
    """

    course = models.ForeignKey(Course, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.STUDENT)
    group = models.ForeignKey(
        Group, null=True, blank=True, on_delete=models.SET_NULL, related_name="memberships"
    )
    # When the student said yes to the group they were named in (the one who signed the
    # group up said so by signing up); empty: not yet.
    confirmed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["course", "user__username"]
        constraints = [
            models.UniqueConstraint(
                fields=["course", "user"],
                name="membership_unique_per_course",
                violation_error_message="This user is already on the course roster.",
            ),
            models.CheckConstraint(
                condition=models.Q(group__isnull=True) | models.Q(role=Role.STUDENT),
                name="membership_only_students_in_groups",
                violation_error_message="Only students can be members of a group.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.course.slug} ({self.get_role_display()})"

    def clean(self) -> None:
        if self.group_id is not None and self.group.course_id != self.course_id:
            raise ValidationError({"group": "The group belongs to another course."})

    @property
    def is_course_staff(self) -> bool:
        return self.role in STAFF_ROLES


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
    """A read-only base disk image. Every host keeps it at the same path."""

    name = models.SlugField(max_length=60, unique=True)
    os = models.CharField("OS", max_length=100)
    login_user = models.CharField(max_length=32, default="student")
    path = models.CharField(max_length=300, help_text="Absolute path of the qcow2 on each host.")
    size_gib = models.PositiveIntegerField("virtual size (GiB)", default=3)
    sha256 = models.CharField(max_length=64, blank=True)
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
    def ssh_command(self) -> str:
        if not (self.host and self.ssh_port):
            return ""
        return f"ssh -p {self.ssh_port} {self.image.login_user}@{self.host.ssh_address}"


class Snapshot(models.Model):
    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=60)
    with_memory = models.BooleanField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
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


class Operation(models.Model):
    """One long operation on a VM: the job row a Celery task claims, and the audit trail."""

    vm = models.ForeignKey(Vm, on_delete=models.PROTECT, related_name="operations")
    kind = models.CharField(max_length=16, choices=OperationKind.choices)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=10, choices=OperationStatus.choices, default=OperationStatus.QUEUED
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    progress = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    # The outbox (labs/compute/dispatch.py): the row is the truth, a task message is a
    # delivery attempt; the sweeper sends again what stays queued and unclaimed.
    sent_at = models.DateTimeField(null=True, blank=True)
    send_attempts = models.PositiveSmallIntegerField(default=0)
    send_error = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["vm"],
                condition=models.Q(status__in=ACTIVE_OPERATION_STATUSES),
                name="one_active_operation_per_vm",
                violation_error_message="Another operation is already queued or running.",
            )
        ]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.vm} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_OPERATION_STATUSES

    @property
    def by_clock(self) -> bool:
        """Asked for by the course clock (labs/compute/clock.py), not by a person."""
        return isinstance(self.params, dict) and "clock" in self.params

    @property
    def requester(self) -> str:
        """Who asked, as the pages say it: a username, "Course clock" or "Stratus"."""
        username = self.requested_by.username if self.requested_by else ""
        return requester_label(username, self.params)

    @property
    def waiting(self) -> str:
        """Why a queued operation has not started yet, for the pages ("" if not waiting)."""
        return waiting_note(self.status, self.send_error, self.created_at)


def requester_label(username: str, params) -> str:
    """The "By" of an operation: the person, the course clock, or Stratus itself."""
    if username:
        return username
    if isinstance(params, dict) and "clock" in params:
        return "Course clock"
    return "Stratus"


WAIT_NOTICE_SECONDS = 30  # a queued operation this old without a worker is worth a word


def waiting_note(status: str, send_error: str, created_at, now=None) -> str:
    """ "waiting for the task queue since 14:03" (the broker did not take it) or "waiting
    for a worker since 14:03" (sent, not claimed for a while); "" otherwise."""
    if status != OperationStatus.QUEUED or created_at is None:
        return ""
    since = timezone.localtime(created_at).strftime("%H:%M")
    if send_error:
        return f"waiting for the task queue since {since}"
    if ((now or timezone.now()) - created_at).total_seconds() > WAIT_NOTICE_SECONDS:
        return f"waiting for a worker since {since}"
    return ""


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


# --- the course clock: class schedules (labs/compute/clock.py) ---------------------------------


class ClassSession(models.Model):
    """A class of a course, in the course's time zone: every week on one weekday (between
    optional first and last dates), or once on one date. Its VMs are ready at its start
    and suspended or stopped after its end (Course.clock_after)."""

    course = models.ForeignKey(Course, on_delete=models.CASCADE, related_name="class_sessions")
    label = models.CharField(max_length=80, blank=True, validators=[one_line_text])
    weekday = models.PositiveSmallIntegerField(
        choices=Weekday.choices, null=True, blank=True, help_text="Weekly classes: the day."
    )
    date = models.DateField(null=True, blank=True, help_text="A single class: its date.")
    starts_at = models.TimeField("start", help_text="Local time, in the course's time zone.")
    ends_at = models.TimeField("end", help_text="Local time, the same day (before midnight).")
    valid_from = models.DateField(
        "first week", null=True, blank=True, help_text="Weekly classes: from this date on."
    )
    valid_until = models.DateField(
        "last week", null=True, blank=True, help_text="Weekly classes: up to this date."
    )

    class Meta:
        ordering = ["course", "date", "weekday", "starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ends_at__gt=models.F("starts_at")),
                name="class_session_ends_after_start",
                violation_error_message="A class ends after it starts (on the same day).",
            ),
            models.CheckConstraint(
                condition=models.Q(weekday__isnull=False, date__isnull=True)
                | models.Q(weekday__isnull=True, date__isnull=False),
                name="class_session_weekly_or_dated",
                violation_error_message="Give a class either a weekday (every week) or a "
                "date (once), not both and not neither.",
            ),
            models.CheckConstraint(
                condition=models.Q(weekday__isnull=True)
                | models.Q(weekday__gte=0, weekday__lte=6),
                name="class_session_weekday_range",
                violation_error_message="A weekday is Monday (0) to Sunday (6).",
            ),
            models.CheckConstraint(
                condition=models.Q(valid_from__isnull=True)
                | models.Q(valid_until__isnull=True)
                | models.Q(valid_until__gte=models.F("valid_from")),
                name="class_session_valid_order",
                violation_error_message="The last week comes on or after the first week.",
            ),
        ]

    def __str__(self) -> str:
        when = self.date.isoformat() if self.date else f"{Weekday(self.weekday).label}s"
        return f"{when} {self.starts_at:%H:%M}–{self.ends_at:%H:%M}"

    def clean(self) -> None:
        errors = {}
        if self.weekday is None and self.date is None:
            errors["weekday"] = "A weekly class needs a weekday; a single class needs a date."
        if self.weekday is not None and self.date is not None:
            errors["date"] = "Give either a weekday (every week) or a date (once), not both."
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            errors["ends_at"] = (
                f"The class ends ({self.ends_at:%H:%M}) before it starts "
                f"({self.starts_at:%H:%M}); a class ends on the day it starts."
            )
        if self.date is not None and (self.valid_from or self.valid_until):
            errors["valid_from"] = "First and last weeks are for weekly classes only."
        if self.valid_from and self.valid_until and self.valid_until < self.valid_from:
            errors["valid_until"] = "The last week comes on or after the first week."
        if errors:
            raise ValidationError(errors)


class ClassHoliday(models.Model):
    """Days without class (both ends included): occurrences on them do not happen."""

    course = models.ForeignKey(Course, on_delete=models.CASCADE, related_name="class_holidays")
    first_day = models.DateField()
    last_day = models.DateField(help_text="The same as the first day for one day off.")
    label = models.CharField(max_length=80, blank=True, validators=[one_line_text])

    class Meta:
        ordering = ["course", "first_day"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(last_day__gte=models.F("first_day")),
                name="class_holiday_order",
                violation_error_message="A holiday's last day comes on or after its first day.",
            )
        ]

    def __str__(self) -> str:
        return self.label or f"{self.first_day}–{self.last_day}"

    def clean(self) -> None:
        if self.first_day and self.last_day and self.last_day < self.first_day:
            raise ValidationError(
                {"last_day": "A holiday's last day comes on or after its first day."}
            )


class ClockAction(models.Model):
    """What the course clock asked for: one row per VM, class window and phase, so that
    a second tick or a restarted beat never asks twice (the unique constraint decides)."""

    vm = models.ForeignKey(Vm, on_delete=models.CASCADE, related_name="clock_actions")
    window_start = models.DateTimeField()
    phase = models.CharField(max_length=8, choices=ClockPhase.choices)
    operation = models.OneToOneField(
        Operation, null=True, on_delete=models.SET_NULL, related_name="clock_action"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["vm", "window_start", "phase"],
                name="one_clock_action_per_vm_window_phase",
                violation_error_message="The course clock already acted on this VM for "
                "this class.",
            )
        ]

    def __str__(self) -> str:
        return f"clock {self.phase} {self.vm} {self.window_start:%Y-%m-%d %H:%M}"
