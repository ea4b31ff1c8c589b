"""Asking for VMs and for operations on them: the services views, the admin and commands
call. Each checks the access policy and the catalogue, then hands the row to dispatch."""

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from labs import access
from labs.access import Action
from labs.choices import GroupStatus, OperationKind
from labs.compute import dispatch, kinds, networks, placement, quotas, term, usage
from labs.compute.kinds import Audience
from labs.errors import Invalid, NotAllowed, Refused
from labs.live import events
from labs.models import Group, Operation, Vm, VmTemplate

log = logging.getLogger(__name__)


def _next_vm_name(group: Group) -> str:
    names = set(Vm.objects.filter(group=group).values_list("name", flat=True))
    n = 1
    while f"vm{n}" in names:
        n += 1
    return f"vm{n}"


def _vm_new(*, group: Group, template: VmTemplate, by: AbstractBaseUser | None) -> Vm:
    vm = Vm.objects.create(
        group=group,
        name=_next_vm_name(group),
        image=template.image,
        vcpus=template.vcpus,
        memory_mib=template.memory_mib,
        disk_gib=template.disk_gib,
        instance_id=uuid.uuid4().hex,
    )
    if placement.vm_place(vm=vm):
        # Its group-network address now, so that the group's other hosts, whose networks
        # are being made at the same time, already list it (labs/compute/networks.py).
        try:
            networks.vm_network_join(vm=vm)
        except Refused as refusal:  # the provision says so on the VM
            log.warning("%s: no group network address yet: %s", vm, refusal)
    dispatch.operation_create(vm=vm, kind=OperationKind.PROVISION, by=by)
    events.vm_changed(vm=vm)
    return vm


def group_vms_create(*, group: Group, by: AbstractBaseUser | None) -> list[Vm]:
    """At approval: create the course template's VMs the group does not have yet."""
    template = quotas.template_of(group)
    if template is None:
        return []
    have = Vm.objects.live().filter(group=group).count()
    return [_vm_new(group=group, template=template, by=by) for _ in range(template.count - have)]


def vm_create(*, group: Group, by: AbstractBaseUser) -> Vm:
    """A member adds one more VM, within the group's quota."""
    with transaction.atomic():
        group = Group.objects.select_for_update().get(pk=group.pk)
        if not access.may(by, Action.VIEW, group):
            raise NotAllowed("Only the group's members and course staff add its VMs.")
        if group.status != GroupStatus.APPROVED:
            raise Refused("Only approved groups have VMs.")
        template = quotas.template_of(group)
        if template is None:
            raise Refused("This course has no VM template yet; ask your instructor.")
        quotas.quota_check(
            group=group,
            need={
                "vms": 1,
                "vcpus": template.vcpus,
                "memory_mib": template.memory_mib,
                "disk_gib": template.disk_gib,
            },
        )
        return _vm_new(group=group, template=template, by=by)


def requester_check(*, kind: kinds.Kind, vm: Vm, by: AbstractBaseUser | None) -> None:
    """May ``by`` ask for ``kind`` on ``vm``? ``None`` is Stratus itself (the clock,
    reconcile), which may ask for anything."""
    if by is None:
        return
    staff = access.is_course_staff(user=by, course=vm.group.course_id, action=Action.OPERATE)
    if kind.audience == Audience.STAFF and not staff:
        raise NotAllowed(f"Only the course's staff can ask for {kind.label.lower()}.")
    if staff or access.may(by, Action.OPERATE, vm):
        return
    if access.may(by, Action.VIEW, vm):
        raise Refused("The group is not approved; ask your instructor.")
    raise NotAllowed("Only the group's members and course staff operate its VMs.")


def rate_check(*, vm: Vm, by: AbstractBaseUser | None) -> None:
    """A group's members ask for at most OPERATIONS_PER_GROUP_PER_MINUTE operations a
    minute (Stratus itself and course staff are not counted)."""
    if by is None or access.is_course_staff(user=by, course=vm.group.course_id):
        return
    since = timezone.now() - timedelta(minutes=1)
    recent = list(
        Operation.objects.filter(vm__group=vm.group_id, created_at__gte=since)
        .exclude(requested_by=None)
        .order_by("created_at")
        .values_list("created_at", flat=True)
    )
    limit = settings.OPERATIONS_PER_GROUP_PER_MINUTE
    if len(recent) >= limit:
        wait = 60 - int((timezone.now() - recent[-limit]).total_seconds())
        raise Refused(
            f"Your group asked for {len(recent)} operations in the last minute, the most "
            f"allowed; try again in {max(wait, 1)} s."
        )


def vm_operation_request(
    *, vm: Vm, kind: str, by: AbstractBaseUser | None, params: dict | None = None
) -> Operation:
    """Ask for one operation on a VM; refused clearly if it makes no sense right now."""
    entry = kinds.requestable(kind)
    if entry is None:
        raise Invalid("Unknown operation.")
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    requester_check(kind=entry, vm=vm, by=by)
    # The deadline's rules: no revert or reset after it, no deleting a final snapshot.
    if (locked := term.request_refusal(kind=entry.kind, vm=vm, by=by, params=params)) is not None:
        raise locked
    rate_check(vm=vm, by=by)
    usage.hours_check(kind=entry.kind, vm=vm, by=by)  # a group past its hours runs no more
    # Busy is left to the database's one-active-operation constraint (dispatch): one query
    # less, and the race between two requests is decided in one place.
    refused = kinds.refusal(entry, vm, active=None)
    if refused is not None:
        raise refused
    params = kinds.params_clean(entry, vm, params)
    return dispatch.operation_create(vm=vm, kind=entry.kind, by=by, params=params)
