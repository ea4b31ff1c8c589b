"""Access ends: close what it opened, within a second, wherever it runs.

``access_ended(user_id=..., reason=...)`` is the one service; Django signals call it
whenever a user's access may have ended:

| what happened                                   | signal                               |
|-------------------------------------------------|--------------------------------------|
| a membership is deleted (or its user)           | ``post_delete`` of Membership        |
| a membership's role changes (admin)             | ``post_save`` of Membership          |
| a role changes in a roster import               | ``roles_changed`` (sent by roster)   |
| a user is deactivated, or their password changes | ``post_save`` of the user model     |
|   or is reset                                   |                                      |
| a user signs out                                | ``user_logged_out``                  |

Where a group's members change (a membership deleted, moved, its role changed; a user
deactivated or reactivated), the accounts on that group's VMs follow too
(``compute.ssh_access.groups_changed``: the guest agent disables the member's account).

It does not decide who loses what: it asks every socket of the user to decide again.
After commit (so they read the new rows):

- ``tickets.console_access_recheck``: every console of the user, in both transports
  (the Channels consumer and the websockify proxy listen on ``console.user.<id>``), runs
  the access policy (``rules.target_for``) and checks its browser session again
  (``consoles.sessions``): a removed member, a demoted TA, a deactivated account, a
  session whose password changed are closed with ``CloseCode.REVOKED``;
- ``events.access_changed``: every ``/ws/events/`` socket of the user re-subscribes
  where the user may listen now, and closes when the account or its session is no
  longer signed in.

A sign-out names its session: that session's sockets close whatever they find (the
session row is deleted only after the signal). Other sessions of the user go on.
"""

import logging

from django.contrib.auth import get_user_model, user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import Signal, receiver

from labs.compute import ssh_access
from labs.consoles import tickets
from labs.consoles.sessions import session_hash
from labs.live import events
from labs.models import Membership

log = logging.getLogger(__name__)

# Sent by bulk writers that bypass post_save (the roster import's bulk_update), with
# ``user_ids``: the users whose course role changed.
roles_changed = Signal()


def access_ended(*, user_id: int, reason: str, session_key: str | None = None) -> None:
    """The user's access may have ended (``reason`` says how, for the audit row and the
    console page): every socket of theirs checks again, after commit. With
    ``session_key``, that browser session's sockets close unconditionally."""
    ended = session_hash(session_key) if session_key else ""

    def publish() -> None:
        tickets.console_access_recheck(user_id=user_id, reason=reason, session_hash=ended)
        events.access_recheck(user_id=user_id, session_hash=ended)

    transaction.on_commit(publish, robust=True)


# --- the signals -------------------------------------------------------------------------


def _guests_follow(*, user_ids=(), group_ids=(), left: bool) -> None:
    """The accounts on the VMs of the users' groups (and of ``group_ids``) follow."""
    groups = set(group_ids) | set(
        Membership.objects.filter(user_id__in=user_ids, group__isnull=False).values_list(
            "group_id", flat=True
        )
    )
    if groups:
        ssh_access.groups_changed(group_ids=groups, left=left)


@receiver(post_delete, sender=Membership, dispatch_uid="revocation.membership_deleted")
def _membership_deleted(sender, instance: Membership, **kwargs) -> None:
    access_ended(user_id=instance.user_id, reason="your course membership was removed")
    if instance.group_id:
        _guests_follow(group_ids=[instance.group_id], left=True)


@receiver(pre_save, sender=Membership, dispatch_uid="revocation.membership_before_save")
def _membership_before_save(sender, instance: Membership, **kwargs) -> None:
    if instance.pk is not None:
        instance._revocation_before = (
            Membership.objects.filter(pk=instance.pk)
            .values_list("role", "course_id", "group_id")
            .first()
        )


@receiver(post_save, sender=Membership, dispatch_uid="revocation.membership_saved")
def _membership_saved(sender, instance: Membership, created: bool, **kwargs) -> None:
    """A role, course or group changed, e.g. in the admin. (Group moves go through
    ``groups.membership_group_set``, which revokes that group's consoles itself; the
    accounts on the VMs of both groups follow from here.)"""
    before = instance.__dict__.pop("_revocation_before", None)
    if created or before is None:
        return
    role, course_id, group_id = before
    if (role, course_id) != (instance.role, instance.course_id):
        access_ended(user_id=instance.user_id, reason="your role in the course changed")
        _guests_follow(group_ids=[group_id, instance.group_id], left=True)
    elif group_id != instance.group_id:
        if group_id:
            _guests_follow(group_ids=[group_id], left=True)
        _guests_follow(group_ids=[instance.group_id], left=False)


@receiver(roles_changed, dispatch_uid="revocation.roles_changed")
def _roles_changed(sender, user_ids, **kwargs) -> None:
    for user_id in user_ids:
        access_ended(user_id=user_id, reason="your role in the course changed")
    _guests_follow(user_ids=user_ids, left=True)


@receiver(user_logged_out, dispatch_uid="revocation.logged_out")
def _logged_out(sender, request, user, **kwargs) -> None:
    if user is None:
        return
    session = getattr(request, "session", None)
    access_ended(
        user_id=user.pk,
        reason="you signed out",
        session_key=session.session_key if session is not None else None,
    )


_WATCHED = ("password", "is_active")


@receiver(pre_save, dispatch_uid="revocation.user_before_save")
def _user_before_save(sender, instance, update_fields=None, **kwargs) -> None:
    """Remember the stored password hash and active flag to compare after the save."""
    if sender is not get_user_model() or instance.pk is None:
        return
    if update_fields is not None and not set(update_fields) & set(_WATCHED):
        return  # e.g. last_login on every sign-in: nothing to compare
    instance._revocation_before = (
        sender.objects.filter(pk=instance.pk).values_list(*_WATCHED).first()
    )


@receiver(post_save, dispatch_uid="revocation.user_saved")
def _user_saved(sender, instance, created: bool, **kwargs) -> None:
    before = instance.__dict__.pop("_revocation_before", None)
    if sender is not get_user_model() or created or before is None:
        return
    password, was_active = before
    if was_active != instance.is_active:
        _guests_follow(user_ids=[instance.pk], left=not instance.is_active)
    if was_active and not instance.is_active:
        access_ended(user_id=instance.pk, reason="your account was deactivated")
    elif password != instance.password:
        access_ended(user_id=instance.pk, reason="your password changed")
