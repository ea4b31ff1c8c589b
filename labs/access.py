"""THE access policy: may this user view, operate, observe or review this object?

Every view, admin page, console transport, events subscription and selector asks here;
nobody re-derives "course staff". Two entry points, after NetBox's
``RestrictedQuerySet.restrict(user, action)``:

- ``restrict(queryset, user=..., action=...)``: the rows of Course, Group, Vm, Operation,
  Snapshot, Membership or ConsoleSession the user may act on that way (subqueries, never a
  join that could repeat rows);
- ``may(user, action, obj)``: the same answer for one object already loaded.

The rules, in one table (``ROLES``):

| action  | who                                                                   |
|---------|-----------------------------------------------------------------------|
| view    | a student member of the group; the course's staff; superusers         |
| operate | a student member of an *approved* group; the course's staff; superusers |
| observe | the course's staff; superusers (view-only consoles)                   |
| review  | the course's staff; superusers (approve, reject, move members, bulk)  |
| quota   | the course's instructors (not TAs), up to the caps a superuser sets; superusers |
| move    | the course's instructors (not TAs); superusers (a VM to another host)  |
| image   | the course's instructors (not TAs); superusers (capture, template's image) |

"Course staff" has one definition: an *active* user with a TA or instructor membership of
the course, or an active superuser. (The Django admin additionally requires ``is_staff``
to enter the site at all: that is Django's gate for the admin, not a second definition.)
"""

from enum import StrEnum

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, Model, OuterRef, Q, QuerySet

from labs.choices import STAFF_ROLES, GroupStatus, Role
from labs.models import (
    ConsoleSession,
    Course,
    FirewallRule,
    Group,
    Membership,
    Operation,
    Publication,
    Snapshot,
    Vm,
    VmTemplate,
    Volume,
)

User = AbstractBaseUser | AnonymousUser


class Action(StrEnum):
    VIEW = "view"
    OPERATE = "operate"
    OBSERVE = "observe"
    REVIEW = "review"
    QUOTA = "quota"  # raise a group's quotas (up to the course's caps)
    MOVE = "move"  # move a VM to another host (its SSH line changes)
    SCHEDULE = "schedule"  # edit the course's class schedule and clock settings
    IMAGE = "image"  # capture a VM as a course image; switch the template to an image
    SHARE = "share"  # put files into the course share (labs/compute/shares.py)


# The course roles that grant each action on every group of the course. Students get
# view and operate on their own group only (below), never through this table.
ROLES: dict[Action, tuple[str, ...]] = {
    Action.VIEW: STAFF_ROLES,
    Action.OPERATE: STAFF_ROLES,
    Action.OBSERVE: STAFF_ROLES,
    Action.REVIEW: STAFF_ROLES,
    Action.QUOTA: (Role.INSTRUCTOR,),
    Action.MOVE: (Role.INSTRUCTOR,),
    Action.SCHEDULE: (Role.INSTRUCTOR,),
    Action.IMAGE: (Role.INSTRUCTOR,),
    Action.SHARE: (Role.INSTRUCTOR,),
}
# What a student member of a group may do with it (operate: only once it is approved).
MEMBER_ACTIONS = frozenset({Action.VIEW, Action.OPERATE})

# For each model, the path from it to its group and to its course.
_GROUP_PATH = {Group: "pk", Vm: "group", Operation: "vm__group", Snapshot: "vm__group"}
_GROUP_PATH[ConsoleSession] = "vm__group"
_GROUP_PATH[Volume] = "group"
_GROUP_PATH[Publication] = "vm__group"
_GROUP_PATH[FirewallRule] = "group"
_COURSE_PATH = {
    Course: "pk",
    Group: "course",
    Membership: "course",
    VmTemplate: "course",
    Vm: "group__course",
    Operation: "vm__group__course",
    Snapshot: "vm__group__course",
    ConsoleSession: "vm__group__course",
    Volume: "group__course",
    Publication: "vm__group__course",
    FirewallRule: "group__course",
}


def _active(user: User | None) -> bool:
    return user is not None and user.is_authenticated and user.is_active


# --- course staff ---------------------------------------------------------------------------


def courses_staffed_by(*, user: User, action: Action = Action.REVIEW) -> QuerySet[Course]:
    """Courses whose every group the user may act on with ``action`` (all for a superuser)."""
    if not _active(user):
        return Course.objects.none()
    if user.is_superuser:
        return Course.objects.all()
    return Course.objects.filter(
        pk__in=Membership.objects.filter(user=user, role__in=ROLES[action]).values("course_id")
    )


def is_course_staff(*, user: User, course: Course | int, action: Action = Action.REVIEW) -> bool:
    """Whether the user acts on the whole course (``action`` decides which roles count)."""
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    course_id = course.pk if isinstance(course, Course) else course
    return Membership.objects.filter(
        user=user, course_id=course_id, role__in=ROLES[action]
    ).exists()


def is_staff_anywhere(*, user: User) -> bool:
    """Whether the user staffs at least one course (the admin's module permission)."""
    return courses_staffed_by(user=user).exists()


def is_member(*, user: User, group: Group | int) -> bool:
    """Whether the user is a student member of the group."""
    if not _active(user):
        return False
    group_id = group.pk if isinstance(group, Group) else group
    return Membership.objects.filter(user=user, group_id=group_id, role=Role.STUDENT).exists()


def member_of_row(*, user: User) -> Exists:
    """For an annotation of Group rows: whether the user is a student member of each
    (``is_member`` in the same query)."""
    return Exists(Membership.objects.filter(user=user, group_id=OuterRef("pk"), role=Role.STUDENT))


def _member_group_ids(user: User) -> QuerySet:
    return Membership.objects.filter(user=user, group__isnull=False, role=Role.STUDENT).values(
        "group_id"
    )


# --- the two entry points -----------------------------------------------------------------------


def restrict(queryset: QuerySet, *, user: User, action: Action) -> QuerySet:
    """The rows of ``queryset`` the user may act on with ``action``."""
    model = queryset.model
    if not _active(user):
        return queryset.none()
    if user.is_superuser:
        return queryset
    course_path = _COURSE_PATH[model]
    allowed = Q(**{f"{course_path}__in": courses_staffed_by(user=user, action=action)})
    group_path = _GROUP_PATH.get(model)
    if group_path is not None and action in MEMBER_ACTIONS:
        mine = Q(**{f"{group_path}__in": _member_group_ids(user)})
        if action == Action.OPERATE:
            status = "status" if model is Group else f"{group_path}__status"
            mine &= Q(**{status: GroupStatus.APPROVED})
        allowed |= mine
    return queryset.filter(allowed)


def may(user: User, action: Action, obj: Model) -> bool:
    """Whether the user may act on ``obj`` (a Course, Group, Vm, Operation or Snapshot)."""
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    group = _group_of(obj)
    course_id = obj.pk if isinstance(obj, Course) else group.course_id
    if is_course_staff(user=user, course=course_id, action=action):
        return True
    if group is None or action not in MEMBER_ACTIONS:
        return False
    if action == Action.OPERATE and group.status != GroupStatus.APPROVED:
        return False
    return is_member(user=user, group=group)


def _group_of(obj: Model) -> Group | None:
    if isinstance(obj, Course):
        return None
    if isinstance(obj, Group):
        return obj
    if isinstance(obj, Vm | Volume | FirewallRule):
        return obj.group
    if isinstance(obj, Operation | Snapshot | ConsoleSession | Publication):
        return obj.vm.group
    raise TypeError(f"no access rule for {type(obj).__name__}")


def may_console(*, user: User, vm: Vm, view_only: bool) -> bool:
    """A driving console needs ``operate``; a view-only one ``observe`` (staff only)."""
    return may(user, Action.OBSERVE if view_only else Action.OPERATE, vm)
