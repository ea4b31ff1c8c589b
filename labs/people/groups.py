"""Group signup, edits and review: every write to a Group goes through here."""

import re

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models.functions import Lower
from django.utils import timezone

from labs import access
from labs.choices import GroupStatus, Role
from labs.compute import ssh_access
from labs.compute.requests import group_vms_create
from labs.consoles import tickets
from labs.errors import NotAllowed
from labs.live import events
from labs.models import Course, Group, Membership
from labs.people import mail
from labs.people.keys import SshKeyInfo, sshkey_parse
from labs.validators import one_line_text

_USERNAME_SPLIT = re.compile(r"[\s,;]+")


def usernames_parse(*, text: str) -> list[str]:
    """Split what a student typed ("bob, carol dave") into usernames, keeping order."""
    seen: dict[str, str] = {}
    for raw in _USERNAME_SPLIT.split(text.strip()):
        name = raw.strip().lstrip("@")
        if name and name.lower() not in seen:
            seen[name.lower()] = name
    return list(seen.values())


def group_register(
    *,
    course: Course,
    by: AbstractBaseUser,
    name: str,
    member_usernames: list[str],
    project_title: str,
    project_idea: str,
    ssh_public_key: str,
) -> Group:
    """Sign up a new pending group: the submitter plus the named students of the course.

    Raises ValidationError (keyed by field) when any rule is broken; nothing is written
    then. Two signups racing for the same student: exactly one wins, the other gets a
    ValidationError naming the student.
    """
    key = _key_parse(ssh_public_key)
    name = name.strip()
    _one_line(name=name, project_title=project_title)
    with transaction.atomic():
        if not course.is_signup_open:
            raise ValidationError("Group signup for this course is closed.", code="closed")
        members = _members_for_signup(course=course, by=by, usernames=member_usernames)
        _check_name_and_key_free(course=course, name=name, key=key, exclude=None)
        try:
            with transaction.atomic():
                group = Group.objects.create(
                    course=course,
                    name=name,
                    project_title=project_title.strip(),
                    project_idea=project_idea.strip(),
                    created_by=by,
                    **_key_fields(key),
                )
        except IntegrityError:
            # Lost a race on the name or the key since the check above.
            _check_name_and_key_free(course=course, name=name, key=key, exclude=None)
            raise
        # The conditional UPDATE is what makes "one group per student" hold under races:
        # a membership that another signup claimed meanwhile no longer matches.
        claimed = Membership.objects.filter(
            pk__in=[m.pk for m in members], group__isnull=True, role=Role.STUDENT
        ).update(group=group, confirmed_at=None)
        Membership.objects.filter(pk=members[0].pk).update(confirmed_at=timezone.now())
        if claimed != len(members):
            taken = Membership.objects.filter(
                pk__in=[m.pk for m in members], group__isnull=False
            ).exclude(group=group)
            names = sorted(m.user.username for m in taken.select_related("user"))
            raise ValidationError({"members": cannot_be_added(names)}, code="taken")
        for member in members:  # their open pages now follow the new group
            events.access_changed(user_id=member.user_id)
        events.group_changed(group=group)
    return group


def cannot_be_added(usernames: list[str]) -> str:
    return (
        f"These usernames cannot be added: {', '.join(usernames)}. Check the spelling, or "
        "ask them whether they are on this course's roster and in no other group."
    )


def _members_for_signup(
    *, course: Course, by: AbstractBaseUser, usernames: list[str]
) -> list[Membership]:
    own = (
        Membership.objects.select_for_update(of=("self",))
        .filter(course=course, user=by)
        .select_related("group")
        .first()
    )
    if own is None or own.role != Role.STUDENT:
        raise ValidationError("Only students on this course's roster can sign up a group.")
    if own.group_id is not None:
        raise ValidationError(
            f"You are already in the group “{own.group.name}” in this course.", code="taken"
        )

    wanted = {u.lower() for u in usernames} - {by.get_username().lower()}
    others = list(
        Membership.objects.select_for_update(of=("self",))
        .annotate(lname=Lower("user__username"))
        .filter(course=course, lname__in=wanted)
        .select_related("user", "group")
    )
    errors = []
    # Not on the roster, staff, or in another group: a student is told no more than that
    # these cannot be added (who is on which roster, or in which group, is not theirs).
    typed = {u.lower(): u for u in usernames}
    refused = sorted(
        [typed[name] for name in wanted - {m.lname for m in others}]
        + [typed[m.lname] for m in others if m.role != Role.STUDENT or m.group_id is not None]
    )
    if refused:
        errors.append(cannot_be_added(refused))
    total = 1 + len(wanted)
    if total > course.max_group_size:
        errors.append(
            f"A group has at most {course.max_group_size} members including you; "
            f"this one would have {total}."
        )
    if errors:
        raise ValidationError({"members": errors}, code="members")
    return [own, *others]


def _check_name_and_key_free(
    *, course: Course, name: str, key: SshKeyInfo, exclude: Group | None
) -> None:
    groups = Group.objects.filter(course=course)
    if exclude is not None:
        groups = groups.exclude(pk=exclude.pk)
    errors = {}
    if name and groups.filter(name__iexact=name).exists():
        errors["name"] = "A group with this name already exists in this course."
    if groups.filter(ssh_key_fingerprint=key.fingerprint).exists():
        errors["ssh_public_key"] = (
            "Another group of this course already uses this key. Each group needs its own "
            "key pair: generate one with ssh-keygen -t ed25519."
        )
    if errors:
        raise ValidationError(errors, code="duplicate")


def _one_line(**fields: str) -> None:
    """The one-line fields hold no control or direction-changing character (whoever calls:
    the form checks it too, the service is where it must hold)."""
    errors = {}
    for field, value in fields.items():
        try:
            one_line_text(value)
        except ValidationError as error:
            errors[field] = error.messages
    if errors:
        raise ValidationError(errors, code="control_character")


def membership_confirm(*, group: Group, by: AbstractBaseUser) -> Membership:
    """A named member says yes to the pending group they were signed up in."""
    with transaction.atomic():
        membership = _own_pending_membership(group=group, by=by)
        if membership.confirmed_at is None:
            membership.confirmed_at = timezone.now()
            membership.save(update_fields=["confirmed_at"])
            events.group_changed(group=group)
    return membership


def membership_decline(*, group: Group, by: AbstractBaseUser) -> Membership:
    """A named member leaves a group that is still pending (the one who signed it up
    edits it instead). The others stay; the reviewer sees one member fewer."""
    with transaction.atomic():
        membership = _own_pending_membership(group=group, by=by)
        if group.created_by_id == by.pk:
            raise ValidationError(
                "You signed this group up: edit it, or ask your teammates to decline.",
                code="submitter",
            )
        membership.group = None
        membership.confirmed_at = None
        membership.save(update_fields=["group", "confirmed_at"])
        events.access_changed(user_id=by.pk)
        events.group_changed(group=group)
    return membership


def _own_pending_membership(*, group: Group, by: AbstractBaseUser) -> Membership:
    membership = (
        Membership.objects.select_for_update()
        .filter(group=group, user=by, role=Role.STUDENT)
        .first()
    )
    if membership is None:
        raise NotAllowed("Only the group's members confirm or decline it.")
    if group.status != GroupStatus.PENDING:
        raise ValidationError(
            "The group has been reviewed; ask your instructor to change its members.",
            code="reviewed",
        )
    return membership


def _key_parse(text: str) -> SshKeyInfo:
    try:
        return sshkey_parse(text=text)
    except ValidationError as error:
        raise ValidationError({"ssh_public_key": error.messages}, code="invalid_key") from None


def _key_fields(key: SshKeyInfo) -> dict[str, object]:
    return {
        "ssh_public_key": key.line,
        "ssh_key_type": key.type,
        "ssh_key_bits": key.bits,
        "ssh_key_fingerprint": key.fingerprint,
    }


def _lock_editable(*, group: Group, by: AbstractBaseUser) -> Group:
    locked = Group.objects.select_for_update().get(pk=group.pk)
    if not access.is_member(user=by, group=locked):
        raise NotAllowed("Only members can change their group.")
    if not locked.is_editable:
        raise ValidationError(
            "This group is approved; ask your instructor to change it.", code="approved"
        )
    return locked


def _resubmit_if_rejected(group: Group) -> bool:
    if group.status != GroupStatus.REJECTED:
        return False
    group.status = GroupStatus.PENDING
    return True


def group_update(
    *, group: Group, by: AbstractBaseUser, project_title: str, project_idea: str
) -> Group:
    """Members edit the idea while the group is pending; a rejected group is resubmitted."""
    _one_line(project_title=project_title)
    with transaction.atomic():
        locked = _lock_editable(group=group, by=by)
        locked.project_title = project_title.strip()
        locked.project_idea = project_idea.strip()
        _resubmit_if_rejected(locked)
        locked.save()
        events.group_changed(group=locked)
    return locked


def group_key_replace(*, group: Group, by: AbstractBaseUser, ssh_public_key: str) -> Group:
    """Members replace the group's key. While pending it is part of the signup (a rejected
    group is resubmitted); once approved it takes effect at once: the group's running VMs
    get it through their agent, the old key leaves them, stopped VMs follow on start."""
    key = _key_parse(ssh_public_key)
    with transaction.atomic():
        locked = Group.objects.select_for_update().get(pk=group.pk)
        if not access.is_member(user=by, group=locked):
            raise NotAllowed("Only members can change their group.")
        _check_name_and_key_free(course=locked.course, name="", key=key, exclude=locked)
        changed = key.line.strip() != locked.ssh_public_key.strip()
        for field, value in _key_fields(key).items():
            setattr(locked, field, value)
        _resubmit_if_rejected(locked)
        if changed:
            locked.ssh_key_changed_at = timezone.now()
        try:
            with transaction.atomic():
                locked.save()
        except IntegrityError:
            _check_name_and_key_free(course=locked.course, name="", key=key, exclude=locked)
            raise
        if changed:
            ssh_access.groups_changed(group_ids=[locked.pk])
        events.group_changed(group=locked)
    return locked


def _review(*, group: Group, by: AbstractBaseUser, status: str, note: str) -> Group:
    if not access.is_course_staff(user=by, course=group.course):
        raise NotAllowed("Only the course's instructors and TAs review its groups.")
    with transaction.atomic():
        locked = (
            Group.objects.select_for_update(of=("self",)).select_related("course").get(pk=group.pk)
        )
        if locked.status == status:
            return locked
        locked.status = status
        locked.review_note = note.strip()
        locked.reviewed_by = by
        locked.reviewed_at = timezone.now()
        locked.save()
        events.group_changed(group=locked)
        if status == GroupStatus.APPROVED:
            # Machines for the group: placed now, provisioned by the workers after commit.
            group_vms_create(group=locked, by=by)
        else:
            vm_ids = list(locked.vms.values_list("pk", flat=True))
            transaction.on_commit(lambda: _revoke(vm_ids, "the group was rejected"))
        # robust: a mail server that fails must not undo, or stop, a review.
        transaction.on_commit(lambda: mail.group_reviewed(group=locked), robust=True)
    return locked


def group_approve(*, group: Group, by: AbstractBaseUser, note: str = "") -> Group:
    """Approve a pending or rejected group, create its VMs and tell its members.

    The VMs come from the course's VM template, each placed on a host with room and
    provisioned by a worker after commit; without room they wait (see compute.placement.vm_place).
    Approving an approved group changes nothing.
    """
    return _review(group=group, by=by, status=GroupStatus.APPROVED, note=note)


def group_reject(*, group: Group, by: AbstractBaseUser, note: str) -> Group:
    """Reject a group with a note for its members; they may edit and resubmit it."""
    if not note.strip():
        raise ValidationError("Say why the group is rejected: its members will read it.")
    return _review(group=group, by=by, status=GroupStatus.REJECTED, note=note)


def _revoke(vm_ids: list[int], reason: str, user_id: int | None = None) -> None:
    for vm_id in vm_ids:
        tickets.console_revoke(vm_id=vm_id, reason=reason, user_id=user_id)


def membership_group_set(
    *, membership: Membership, group: Group | None, by: AbstractBaseUser
) -> Membership:
    """Course staff move a student into a group, or out of one (``group=None``).

    A student taken out of a group loses its consoles at once, and their account on its
    VMs (``revocation``, on the membership's save).
    """
    if not access.is_course_staff(user=by, course=membership.course):
        raise NotAllowed("Only the course's instructors and TAs change group members.")
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(pk=membership.pk)
        old_group_id = locked.group_id
        if group is not None:
            if group.course_id != locked.course_id:
                raise ValidationError("The group belongs to another course.")
            if locked.role != Role.STUDENT:
                raise ValidationError("Only students can be members of a group.")
            size = Membership.objects.filter(group=group).exclude(pk=locked.pk).count()
            if size + 1 > locked.course.max_group_size:
                raise ValidationError(
                    f"The group has {size} members; the course allows "
                    f"{locked.course.max_group_size}."
                )
        locked.group = group
        locked.save(update_fields=["group"])
        if old_group_id != locked.group_id:
            # First the member's own connections re-subscribe, then both groups' pages
            # (members lists) refresh.
            events.access_changed(user_id=locked.user_id)
            for changed in Group.objects.filter(pk__in=[old_group_id, locked.group_id]):
                events.group_changed(group=changed)
        if old_group_id is not None and old_group_id != locked.group_id:
            vm_ids = list(Group.objects.get(pk=old_group_id).vms.values_list("pk", flat=True))
            user_id = locked.user_id
            transaction.on_commit(
                lambda: _revoke(vm_ids, "you are no longer a member of the group", user_id)
            )
    return locked
