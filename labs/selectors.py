"""Reads, always through the access policy (``labs.access``).

A group, VM or course the user may not see is a 404, never a 403: the page must not even
confirm that it exists.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Exists, OuterRef, Prefetch, QuerySet, Subquery
from django.http import Http404

from labs import access
from labs.access import Action
from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    GroupStatus,
    ObservedState,
    OperationKind,
    OperationStatus,
)
from labs.compute.placement import HostUsage, host_usages
from labs.models import Course, Group, Membership, Operation, Vm, requester_label, waiting_note


def memberships_of(*, user: AbstractBaseUser) -> QuerySet[Membership]:
    """The user's course memberships, with course and group, for the home page."""
    return Membership.objects.filter(user=user).select_related("course", "group__created_by")


def _group_page(groups: QuerySet[Group]) -> QuerySet[Group]:
    members = Prefetch(
        "memberships",
        queryset=Membership.objects.select_related("user").order_by("user__username"),
    )
    return groups.select_related("course", "reviewed_by").prefetch_related(members)


def group_for_viewer(*, user: AbstractBaseUser, group_id: int) -> Group:
    """One group with its members, if the user may view it (a member, course staff);
    else 404."""
    group = _group_page(
        access.restrict(Group.objects.all(), user=user, action=Action.VIEW).filter(pk=group_id)
    ).first()
    if group is None:
        raise Http404("No such group.")
    return group


def group_head_for_viewer(*, user: AbstractBaseUser, group_id: int) -> Group:
    """What the group page needs before its cached parts, if the user may view the group
    (a member, course staff); else 404: the row's own columns, nothing joined, and
    ``viewer_is_member`` (a student member, not staff). The parts that must be rendered
    read the whole group then (``group_for_push``)."""
    group = (
        access.restrict(Group.objects.all(), user=user, action=Action.VIEW)
        .filter(pk=group_id)
        .only("pk", "name", "course_id", "status", "updated_at")
        .annotate(viewer_is_member=access.member_of_row(user=user))
        .first()
    )
    if group is None:
        raise Http404("No such group.")
    return group


def group_for_push(*, group_id: int) -> Group | None:
    """One group with its members, for the live renderer (``labs.live.regions``), or None.

    Read for no user: the rendering goes to a channel-layer group, and who listens there
    was decided by the access policy when the socket subscribed (``events.channels_for``:
    the group's members; the course's staff).
    """
    return _group_page(Group.objects.filter(pk=group_id)).first()


def courses_for_push(*, course_ids: set[int]) -> list[Course]:
    """The courses whose overview the live renderer renders (for their staff's channel)."""
    return list(Course.objects.filter(pk__in=course_ids).order_by("pk")) if course_ids else []


def group_for_member(*, user: AbstractBaseUser, group_id: int) -> Group:
    """One group the user is a student member of (to change it); else 404."""
    group = Group.objects.select_related("course").filter(pk=group_id).first()
    if group is None or not access.is_member(user=user, group=group):
        raise Http404("No such group.")
    return group


def course_membership(*, user: AbstractBaseUser, slug: str) -> Membership:
    """The user's membership of the course with this slug; 404 when not on its roster."""
    membership = (
        Membership.objects.select_related("course", "group")
        .filter(user=user, course__slug=slug)
        .first()
    )
    if membership is None:
        raise Http404("No such course.")
    return membership


def vm_for_user(*, user: AbstractBaseUser, vm_id: int) -> Vm:
    """A live VM the user may view (its group's member, course staff); else 404."""
    vm = (
        access.restrict(Vm.objects.live(), user=user, action=Action.VIEW)
        .select_related("group__course", "host", "image")
        .filter(pk=vm_id)
        .first()
    )
    if vm is None:
        raise Http404("No such VM.")
    return vm


def vms_of_group(*, group: Group) -> list[Vm]:
    """The group's live VMs with snapshots and the operation in progress (if any).

    ``vm.active_operations`` holds at most one row (a database constraint), so the page
    never loads a VM's whole history for it.
    """
    active = Prefetch(
        "operations",
        queryset=Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES),
        to_attr="active_operations",
    )
    return list(
        group.vms.live()
        .select_related("host", "image")
        .prefetch_related("snapshots", active)
        .order_by("name")
    )


def operations_of_group(*, group: Group, limit: int = 30) -> list[Operation]:
    return list(
        Operation.objects.filter(vm__group=group)
        .select_related("vm", "requested_by")
        .order_by("-created_at")[:limit]
    )


# --- the instructor overview ------------------------------------------------------------------


def course_for_staff(*, user: AbstractBaseUser, slug: str) -> Course:
    """The course with this slug if the user staffs it (or is a superuser); else 404."""
    course = access.restrict(Course.objects.filter(slug=slug), user=user, action=Action.REVIEW)
    course = course.first()
    if course is None:
        raise Http404("No such course.")
    return course


def groups_of_course(*, course: Course, status: str | None = None) -> QuerySet[Group]:
    """The course's groups (of one status), by name. For course staff only."""
    groups = Group.objects.filter(course=course).order_by("name")
    return groups if status is None else groups.filter(status=status)


@dataclass(frozen=True)
class OverviewVm:
    pk: int
    name: str
    state: str  # ObservedState value
    state_label: str
    activity: str  # the operation in progress, "Shut down: queued", or ""
    host_name: str = ""  # "" while it waits for a host
    unknown_since: datetime | None = None  # unknown: since when (``Vm.unknown_since``)
    activity_reason: str = ""  # why the operation in progress waits (its error), or ""


@dataclass(frozen=True)
class OverviewHostVm:
    group_id: int
    vm_id: int
    label: str  # "Alpha/vm1"


@dataclass(frozen=True)
class OverviewHost:
    """A host of the Hosts table: its usage and the course's live VMs on it."""

    usage: HostUsage
    vms: list[OverviewHostVm]  # by group, then name; all of them (``shown_vms``: the first)

    @property
    def shown_vms(self) -> list[OverviewHostVm]:
        return self.vms[:HOST_VMS_SHOWN]

    @property
    def more_vms(self) -> int:
        return max(len(self.vms) - HOST_VMS_SHOWN, 0)


HOST_VMS_SHOWN = 6  # the Hosts table names this many of a host's VMs, then "and N more"


@dataclass(frozen=True)
class OverviewGroup:
    pk: int
    name: str
    status: str  # GroupStatus value
    status_label: str
    members: list[str]  # usernames
    vms: list[OverviewVm]
    last_operation: str  # "Start: failed", or ""
    last_operation_status: str  # OperationStatus value, or ""


@dataclass(frozen=True)
class OverviewOperation:
    created_at: datetime
    group_id: int
    group_name: str
    vm_name: str
    kind_label: str
    snapshot_name: str
    requested_by: str  # username, "Course clock" or "Stratus" (models.requester_label)
    status: str
    status_label: str
    error: str
    progress: str  # only while it is queued or running


@dataclass(frozen=True)
class CourseOverview:
    course: Course
    groups: list[OverviewGroup]  # every group of the course, by name
    group_counts: list[tuple[str, str, int]]  # (status, label, count), every status
    vm_counts: list[tuple[str, str, int]]  # (observed state, label, count), states present
    hosts: list[OverviewHost]
    operations: list[OverviewOperation]  # failed first, then newest first

    @property
    def approved_groups(self) -> list[OverviewGroup]:
        return [g for g in self.groups if g.status == GroupStatus.APPROVED]


_GROUP_STATUS = dict(GroupStatus.choices)
_VM_STATE = dict(ObservedState.choices)
_OP_KIND = dict(OperationKind.choices)
_OP_STATUS = dict(OperationStatus.choices)


def course_overview(*, course: Course, operations_limit: int = 50) -> CourseOverview:
    """Everything the course staff's overview shows, in a fixed number of queries.

    Seven queries, however many groups, VMs, hosts and operations: groups (with their
    last operation by subquery), members, live VMs (with their host's name), operations in
    progress, the failures still standing, the newest operations and hosts (one grouped
    query; the course's VMs on each come from the live VMs' rows). Rows are read as
    values, not model instances: the page is a hot one (every live update of every open
    overview). It stays one function so that the query count can be read off it.
    """
    last_op = Operation.objects.filter(vm__group=OuterRef("pk")).order_by("-created_at", "-pk")
    groups = (
        Group.objects.filter(course=course)
        .annotate(
            last_kind=Subquery(last_op.values("kind")[:1]),
            last_status=Subquery(last_op.values("status")[:1]),
        )
        .order_by("name")
        .values_list("pk", "name", "status", "last_kind", "last_status")
    )
    members: dict[int, list[str]] = defaultdict(list)
    for group_id, username in (
        Membership.objects.filter(course=course, group__isnull=False)
        .order_by("user__username")
        .values_list("group_id", "user__username")
    ):
        members[group_id].append(username)
    activity: dict[int, tuple[str, str]] = {}
    for vm_id, kind, status, progress, error, send_error, created_at in Operation.objects.filter(
        vm__group__course=course, status__in=ACTIVE_OPERATION_STATUSES
    ).values_list("vm_id", "kind", "status", "progress", "error", "send_error", "created_at"):
        text = f"{_OP_KIND.get(kind, kind)}: {_OP_STATUS.get(status, status).lower()}"
        if progress:
            text += f" — {progress}"
        if note := waiting_note(status, send_error, created_at):
            text += f" — {note}"
        activity[vm_id] = (text, error)
    vms: dict[int, list[OverviewVm]] = defaultdict(list)
    on_host: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # (group, VM, name)
    vm_tally: Counter[str] = Counter()
    for pk, group_id, name, state, observed_at, host_id, host_name, host_since in (
        Vm.objects.live()
        .filter(group__course=course)
        .order_by("name", "pk")
        .values_list(
            "pk",
            "group_id",
            "name",
            "observed_state",
            "observed_at",
            "host_id",
            "host__name",
            "host__unreachable_since",
        )
    ):
        doing, reason = activity.get(pk, ("", ""))
        vms[group_id].append(
            OverviewVm(
                pk,
                name,
                state,
                _VM_STATE.get(state, state),
                doing,
                host_name=host_name or "",
                # As Vm.unknown_since, from the row's values.
                unknown_since=(host_since or observed_at)
                if state == ObservedState.UNKNOWN
                else None,
                activity_reason=reason,
            )
        )
        if host_id is not None:
            on_host[host_id].append((group_id, pk, name))
        vm_tally[state] += 1
    rows = [
        OverviewGroup(
            pk=pk,
            name=name,
            status=status,
            status_label=_GROUP_STATUS.get(status, status),
            members=members.get(pk, []),
            vms=vms.get(pk, []),
            last_operation=f"{_OP_KIND.get(kind, kind)}: {_OP_STATUS.get(op_status, '').lower()}"
            if kind
            else "",
            last_operation_status=op_status or "",
        )
        for pk, name, status, kind, op_status in groups
    ]
    group_names = {g.pk: g.name for g in rows}
    hosts = [
        OverviewHost(
            usage=usage,
            vms=[
                OverviewHostVm(group_id, vm_id, f"{group_names.get(group_id, '?')}/{vm_name}")
                for group_id, vm_id, vm_name in sorted(
                    on_host.get(usage.host.pk, []),
                    key=lambda row: (group_names.get(row[0], ""), row[2]),
                )
            ],
        )
        for usage in host_usages(course=course)
    ]
    group_tally = Counter(g.status for g in rows)
    return CourseOverview(
        course=course,
        groups=rows,
        group_counts=[(s, label, group_tally[s]) for s, label in GroupStatus.choices],
        vm_counts=[(s, label, vm_tally[s]) for s, label in ObservedState.choices if vm_tally[s]],
        hosts=hosts,
        operations=_operations_failed_first(course=course, limit=operations_limit),
    )


def _operations_failed_first(*, course: Course, limit: int) -> list[OverviewOperation]:
    """The course's operations, newest first, with the failures still standing on top.

    A failure stands until the same VM has an operation that succeeded after it: a start
    that failed in week 2 and worked on the next try must not sit above this week's work
    for the rest of the term.
    """
    put_right = Operation.objects.filter(
        vm=OuterRef("vm"), status=OperationStatus.SUCCEEDED, created_at__gt=OuterRef("created_at")
    )
    ops = Operation.objects.filter(vm__group__course=course).order_by("-created_at", "-pk")
    fields = (
        "pk",
        "created_at",
        "vm__group_id",
        "vm__group__name",
        "vm__name",
        "kind",
        "params",
        "requested_by__username",
        "status",
        "error",
        "progress",
    )
    standing = list(
        ops.filter(status=OperationStatus.FAILED)
        .filter(~Exists(put_right))
        .values_list(*fields)[:limit]
    )
    shown = {row[0] for row in standing}
    newest = [row for row in ops.values_list(*fields)[:limit] if row[0] not in shown]
    rows = (standing + newest)[:limit]
    return [
        OverviewOperation(
            created_at=created_at,
            group_id=group_id,
            group_name=group_name,
            vm_name=vm_name,
            kind_label=_OP_KIND.get(kind, kind),
            snapshot_name=str(params.get("name", "")) if isinstance(params, dict) else "",
            requested_by=requester_label(username or "", params),
            status=status,
            status_label=_OP_STATUS.get(status, status),
            error=error,
            progress=progress if status in ACTIVE_OPERATION_STATUSES else "",
        )
        for (
            _pk,
            created_at,
            group_id,
            group_name,
            vm_name,
            kind,
            params,
            username,
            status,
            error,
            progress,
        ) in rows
    ]
