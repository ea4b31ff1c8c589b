"""One operation on many VMs of a course at once, for its staff (the overview's bulk form).

Each VM gets its own Operation through ``requests.vm_operation_request``, exactly as if
someone had pressed the button on its group's page, and is judged by the same rule
(``kinds.refusal``): a VM that cannot take the operation right now (busy, not created
yet, in a state the kind does not accept) is skipped with its reason; the others go on.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Prefetch

from labs import access
from labs.access import Action
from labs.choices import ACTIVE_OPERATION_STATUSES, GroupStatus
from labs.compute import kinds
from labs.compute.requests import vm_operation_request
from labs.errors import Invalid, NotAllowed, StratusError
from labs.models import Course, Operation, Vm

SUMMARY_REASONS = 5


@dataclass(frozen=True)
class BulkSkip:
    """A VM the operation was not asked for, and why (a sentence about the VM)."""

    group: str
    vm: str
    reason: str

    def __str__(self) -> str:
        # The refusals start with the VM's name ("vm1 is not running.").
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
    params: dict | None = None,
) -> BulkResult:
    """Ask for ``kind`` on every live VM of the course's chosen groups, one Operation each.

    ``group_ids=None`` means every approved group of the course. Ids of groups outside the
    course refuse the whole request (nothing is queued): a form never sends them.
    """
    if not access.is_course_staff(user=by, course=course, action=Action.OPERATE):
        raise NotAllowed("Only the course's staff act on all its groups.")
    entry = kinds.requestable(kind)
    if entry is None or not entry.bulk:  # no bulk delete or revert of a whole course
        offered = ", ".join(k.label.lower() for k in kinds.bulk_kinds())
        raise Invalid(f"Choose one of: {offered}.")
    groups = course.groups.all()
    if group_ids is None:
        groups = groups.filter(status=GroupStatus.APPROVED)
    else:
        wanted = {int(pk) for pk in group_ids}
        if not wanted:
            raise Invalid("Select at least one group.")
        groups = groups.filter(pk__in=wanted)
        if groups.count() != len(wanted):
            raise Invalid("Some of the selected groups are not in this course.")
    active = Prefetch(
        "operations",
        queryset=Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES),
        to_attr="active_operations",
    )
    vms = (
        Vm.objects.live()
        .filter(group__in=groups)
        .select_related("group")
        .prefetch_related(active)
        .order_by("group__name", "name")
    )
    result = BulkResult(kind=kind)
    with transaction.atomic():  # the tasks are sent once every row is written
        for vm in vms:
            refused = _refusal(vm, entry)
            if refused is None:
                try:
                    result.queued.append(
                        vm_operation_request(vm=vm, kind=kind, by=by, params=params)
                    )
                    continue
                except StratusError as error:  # raced with another request
                    refused = error
            result.skipped.append(
                BulkSkip(group=vm.group.name, vm=vm.name, reason=refused.message)
            )
    return result


def _refusal(vm: Vm, entry: kinds.Kind) -> StratusError | None:
    """The catalogue's verdict from what is loaded (no query per VM)."""
    active = vm.active_operations[0] if vm.active_operations else None
    return kinds.refusal(entry, vm, active=active)
