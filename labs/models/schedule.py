from django.core.exceptions import ValidationError
from django.db import models

from labs.choices import (
    ClockPhase,
    Weekday,
)
from labs.models.courses import Course
from labs.models.operations import Operation
from labs.models.vms import Vm
from labs.validators import one_line_text

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
