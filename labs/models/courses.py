from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from labs.choices import (
    STAFF_ROLES,
    ClockAfter,
    GroupStatus,
    IdleAction,
    PlacementPolicy,
    Role,
)
from labs.validators import guest_port_list, one_line_text, time_zone_name


def _default_time_zone() -> str:
    return settings.TIME_ZONE


def _default_published_ports() -> int:
    return settings.PUBLISHED_PORTS_PER_GROUP


def _default_forbidden_ports() -> str:
    return ",".join(str(port) for port in settings.PUBLISHED_PORTS_FORBIDDEN)


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
    # Published ports (labs/compute/ports.py, docs/networking.md).
    published_ports_per_group = models.PositiveSmallIntegerField(
        "published ports per group",
        default=_default_published_ports,
        help_text="How many guest ports one group may publish on the hosts' address at once.",
    )
    forbidden_guest_ports = models.CharField(
        "guest ports never published",
        max_length=200,
        blank=True,
        default=_default_forbidden_ports,
        validators=[guest_port_list],
        help_text="Comma-separated guest ports members may not publish (22 is forwarded for "
        "SSH already and always refused; 25: no mail servers).",
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
    # Idle machines (labs/compute/idle.py).
    idle_minutes = models.PositiveSmallIntegerField(
        "idle: act after (minutes)",
        default=60,
        help_text="A running VM nobody has used this long (no console, no login, low CPU) "
        "is suspended or shut down. 0 turns the idle rule off.",
    )
    idle_warn_minutes = models.PositiveSmallIntegerField(
        "idle: warn before (minutes)",
        default=10,
        help_text="How long before acting the group page warns, with a Keep running button.",
    )
    idle_action = models.CharField(
        "idle: action",
        max_length=8,
        choices=IdleAction.choices,
        default=IdleAction.SAVE,
    )
    # Shared files (labs/compute/shares.py): a group share and the course share in every
    # VM made or reset while this is on (virtiofs: no live move, no suspend to disk).
    shares = models.BooleanField(
        "shared files",
        default=False,
        help_text="Every VM made or reset from now on mounts its group's share (/srv/group, "
        "read-write) and the course share (/srv/course, read-only). Such VMs cannot be "
        "suspended to disk or moved live; the clock shuts them down instead.",
    )
    idle_cpu_percent = models.PositiveSmallIntegerField(
        "idle: CPU below (%)",
        default=5,
        help_text="A VM busier than this (percent of its vCPUs, between two minutes) is "
        "in use even with nobody logged in.",
    )
    # Usage hours (labs/compute/usage.py).
    hours_quota = models.PositiveIntegerField(
        "hours per group",
        null=True,
        blank=True,
        help_text="Running hours a group's VMs may use this term (empty: no limit). Warned "
        "at 80 %, suspended at 100 %.",
    )
    hours_per_student = models.BooleanField(
        "count each student too",
        default=False,
        help_text="Also count, and limit to the same hours, the running time each student "
        "started.",
    )
    hours_exclude_class = models.BooleanField(
        "class time is free",
        default=True,
        help_text="Running time during scheduled classes does not count against the hours.",
    )
    # The deadline and the end of term (labs/compute/term.py).
    deadline_at = models.DateTimeField(
        "project deadline",
        null=True,
        blank=True,
        help_text="Every VM gets a final snapshot then; students can no longer revert or reset.",
    )
    deadline_done_at = models.DateTimeField(null=True, blank=True, editable=False)
    term_ends_at = models.DateTimeField(
        "end of term",
        null=True,
        blank=True,
        help_text="The groups' VMs are archived and removed then; accounts stay.",
    )
    term_warning_days = models.PositiveSmallIntegerField(
        "warn members (days before the end)", default=7
    )
    term_warned_at = models.DateTimeField(null=True, blank=True, editable=False)
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)
    rolled_over_from = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="rolled_over_to",
        editable=False,
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
    def forbidden_ports(self) -> frozenset[int]:
        """The guest ports its members may not publish: the list, and SSH's always."""
        listed = {int(p) for p in self.forbidden_guest_ports.split(",") if p.strip().isdigit()}
        return frozenset(listed | {22})

    def clean(self) -> None:
        errors = {}
        if self.idle_minutes and self.idle_warn_minutes >= self.idle_minutes:
            errors["idle_warn_minutes"] = (
                f"The warning comes before the action: less than the idle time "
                f"({self.idle_minutes} min)."
            )
        if self.deadline_at and self.term_ends_at and self.term_ends_at <= self.deadline_at:
            errors["term_ends_at"] = (
                "The term ends after the deadline: the final snapshots are taken at the "
                "deadline and archived at the end of term."
            )
        if errors:
            raise ValidationError(errors)

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
    extra_hours = models.PositiveIntegerField(
        default=0, help_text="Running hours granted on top of the course's hours per group."
    )
    hours_warned_at = models.DateTimeField(null=True, blank=True, editable=False)

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
