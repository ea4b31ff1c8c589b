"""One operation on many VMs of a course at once, for its staff (the overview's bulk form).

Each VM gets its own Operation through ``vms.vm_operation_request``, exactly as if someone
had pressed the button on its group's page. A VM that cannot take the operation right now
(busy, not created yet, in the wrong state) is skipped with its reason; the others go on.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Prefetch

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    DesiredState,
    GroupStatus,
    ObservedState,
    OperationKind,
)
from labs.models import Course, Operation, Vm
from labs.selectors import user_is_course_staff
from labs.services.vms import vm_operation_request

BULK_KINDS = (
    OperationKind.START,
    OperationKind.STOP,
    OperationKind.SNAPSHOT,
    OperationKind.RESET,
)
# The observed states a VM must be in for the kind; other kinds take any created VM.
_NEEDS_STATE = {
    OperationKind.START: ObservedState.SHUTOFF,
    OperationKind.STOP: ObservedState.RUNNING,
}
SUMMARY_REASONS = 5


@dataclass(frozen=True)
class BulkSkip:
    """A VM the operation was not asked for, and why (a sentence about the VM)."""

    group: str
    vm: str
    reason: str

    def __str__(self) -> str:
        # The services' refusals start with the VM's name ("vm1 is not running.").
        if self.reason.startswith(f"{self.vm} "):
            return f"{self.group}/{self.reason}".rstrip(".")
        return f"{self.group}/{self.vm}: {self.reason}".rstrip(".")


@dataclass
class BulkResult:
    kind: str
    queued: list[Operation] = field(default_factory=list)
    skipped: list[BulkSkip] = field(default_factory=list)

    def summary(self) -> str:
        """``Queued 12 operations; skipped 2: Alpha/vm1 is not running; …``"""
        if not self.queued and not self.skipped:
            return "The selected groups have no VMs."
        n = len(self.queued)
        text = f"Queued {n} operation{'s' if n != 1 else ''}" if n else "Queued nothing"
        if self.skipped:
            reasons = "; ".join(str(skip) for skip in self.skipped[:SUMMARY_REASONS])
            more = len(self.skipped) - SUMMARY_REASONS
            if more > 0:
                reasons += f"; and {more} more"
            text += f"; skipped {len(self.skipped)}: {reasons}"
        return text + "."


def vms_bulk_request(
    *,
    course: Course,
    kind: str,
    by: AbstractBaseUser,
    group_ids: Iterable[int] | None = None,
) -> BulkResult:
    """Ask for ``kind`` on every live VM of the course's chosen groups, one Operation each.

    ``group_ids=None`` means every approved group of the course. Ids of groups outside the
    course refuse the whole request (nothing is queued): a form never sends them.
    """
    if not user_is_course_staff(user=by, course=course):
        raise PermissionDenied("Only the course's staff act on all its groups.")
    if kind not in BULK_KINDS:
        raise ValidationError("Choose start, shut down, snapshot or reset to baseline.")
    groups = course.groups.all()
    if group_ids is None:
        groups = groups.filter(status=GroupStatus.APPROVED)
    else:
        wanted = {int(pk) for pk in group_ids}
        if not wanted:
            raise ValidationError("Select at least one group.")
        groups = groups.filter(pk__in=wanted)
        if groups.count() != len(wanted):
            raise ValidationError("Some of the selected groups are not in this course.")
    active = Prefetch(
        "operations",
        queryset=Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES),
        to_attr="active_operations",
    )
    vms = (
        Vm.objects.filter(group__in=groups)
        .exclude(desired_state=DesiredState.DELETED)
        .select_related("group")
        .prefetch_related(active)
        .order_by("group__name", "name")
    )
    result = BulkResult(kind=kind)
    with transaction.atomic():  # the tasks are sent once every row is written
        for vm in vms:
            reason = _refusal(vm, kind)
            if reason is None:
                try:
                    result.queued.append(vm_operation_request(vm=vm, kind=kind, by=by))
                    continue
                except ValidationError as error:  # raced with another request
                    reason = " ".join(error.messages)
            result.skipped.append(BulkSkip(group=vm.group.name, vm=vm.name, reason=reason))
    return result


def _refusal(vm: Vm, kind: str) -> str | None:
    """Why the VM cannot take the operation now, from what is loaded; None if it can."""
    if vm.active_operations:
        what = vm.active_operations[0].get_kind_display().lower()
        return f"{vm.name} is busy ({what} in progress)."
    if vm.host_id is None or vm.observed_state == ObservedState.NEW:
        return f"{vm.name} is not created yet."
    needed = _NEEDS_STATE.get(kind)
    if needed is not None and vm.observed_state != needed:
        return f"{vm.name} is {vm.get_observed_state_display().lower()}."
    return None
