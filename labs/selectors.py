"""Reads, always scoped to what the asking user may see.

A group or course the user may not see is a 404, never a 403: the page must not even
confirm that it exists.
"""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Prefetch, Q, QuerySet
from django.http import Http404

from labs.choices import ACTIVE_OPERATION_STATUSES, STAFF_ROLES, DesiredState, Role
from labs.models import Course, Group, Membership, Operation, Vm


def memberships_of(*, user: AbstractBaseUser) -> QuerySet[Membership]:
    """The user's course memberships, with course and group, for the home page."""
    return Membership.objects.filter(user=user).select_related("course", "group")


def courses_staffed_by(*, user: AbstractBaseUser) -> QuerySet[Course]:
    """Courses where the user is an instructor or TA (every course for a superuser)."""
    if user.is_superuser:
        return Course.objects.all()
    return Course.objects.filter(
        memberships__user=user, memberships__role__in=STAFF_ROLES
    ).distinct()


def user_is_course_staff(*, user: AbstractBaseUser, course: Course) -> bool:
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    return Membership.objects.filter(user=user, course=course, role__in=STAFF_ROLES).exists()


def groups_visible_to(*, user: AbstractBaseUser) -> QuerySet[Group]:
    """Groups the user belongs to, plus every group of the courses they teach."""
    if not user.is_authenticated:
        return Group.objects.none()
    if user.is_superuser:
        return Group.objects.all()
    staffed = courses_staffed_by(user=user)
    return Group.objects.filter(Q(memberships__user=user) | Q(course__in=staffed)).distinct()


def group_for_viewer(*, user: AbstractBaseUser, group_id: int) -> Group:
    """One group with its members, if the user is a member or course staff; else 404."""
    members = Prefetch(
        "memberships",
        queryset=Membership.objects.select_related("user").order_by("user__username"),
    )
    group = (
        Group.objects.select_related("course", "reviewed_by")
        .prefetch_related(members)
        .filter(pk=group_id)
        .first()
    )
    if group is None or not user.is_authenticated:
        raise Http404("No such group.")
    if any(m.user_id == user.pk for m in group.memberships.all()):
        return group
    if user_is_course_staff(user=user, course=group.course):
        return group
    raise Http404("No such group.")


def group_for_member(*, user: AbstractBaseUser, group_id: int) -> Group:
    """One group the user is a student member of (to change it); else 404."""
    group = (
        Group.objects.select_related("course")
        .filter(pk=group_id, memberships__user=user, memberships__role=Role.STUDENT)
        .first()
    )
    if group is None:
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
    """A live VM of a group the user is a member of, or of a course they teach; else 404."""
    vm = (
        Vm.objects.select_related("group__course", "host", "image")
        .exclude(desired_state=DesiredState.DELETED)
        .filter(pk=vm_id)
        .first()
    )
    if vm is None or not user.is_authenticated:
        raise Http404("No such VM.")
    if Membership.objects.filter(user=user, group=vm.group_id).exists():
        return vm
    if user_is_course_staff(user=user, course=vm.group.course):
        return vm
    raise Http404("No such VM.")


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
        group.vms.exclude(desired_state=DesiredState.DELETED)
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
