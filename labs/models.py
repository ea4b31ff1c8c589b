from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from labs.choices import STAFF_ROLES, GroupStatus, Role


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
    name = models.CharField(max_length=80)
    project_title = models.CharField(max_length=200)
    project_idea = models.TextField(max_length=5000)
    ssh_public_key = models.TextField(help_text="One OpenSSH public key line.")
    ssh_key_type = models.CharField(max_length=64)
    ssh_key_bits = models.PositiveIntegerField()
    ssh_key_fingerprint = models.CharField(max_length=100)
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
