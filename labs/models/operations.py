from django.conf import settings
from django.db import models
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    OperationKind,
    OperationStatus,
)
from labs.models.vms import Vm


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
