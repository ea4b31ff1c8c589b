"""Emails Stratus sends. Bodies are templates under templates/labs/email/.

No password, ticket or key material is ever put in a message.
"""

import unicodedata
from collections.abc import Iterable

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core import mail
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from labs.models import Course, Group
from labs.people.tokens import account_tokens


def header_text(text: str, *, limit: int = 200) -> str:
    """Free text made safe for a mail header: one line, no control or format character
    (a newline in a group name must never break, or forge, a header)."""
    kept = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    return " ".join(kept.split())[:limit]


def _message(*, to: str, subject: str, template: str, context: dict) -> mail.EmailMessage:
    body = render_to_string(template, {"site_url": settings.SITE_URL, **context})
    return mail.EmailMessage(subject=header_text(subject), body=body, to=[to])


def invitation_link(*, user: AbstractBaseUser) -> str:
    """A link where the user sets their first password (Django's password-reset token)."""
    path = reverse(
        "password_reset_confirm",
        kwargs={
            "uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
            "token": account_tokens.make_token(user),
        },
    )
    return f"{settings.SITE_URL}{path}"


def invitations(*, users: Iterable[AbstractBaseUser], course: Course) -> int:
    """Send every new account its invitation over one connection; returns the count."""
    messages = [
        _message(
            to=user.email,
            subject=f"[{course.slug}] Your Stratus account",
            template="labs/email/invitation.txt",
            context={"user": user, "course": course, "link": invitation_link(user=user)},
        )
        for user in users
        if user.email
    ]
    if not messages:
        return 0
    return mail.mailers.default.send_messages(messages) or 0


def group_reviewed(*, group: Group) -> int:
    """Tell every member that their group was approved or rejected."""
    members = [m.user for m in group.memberships.select_related("user") if m.user.email]
    messages = [
        _message(
            to=user.email,
            subject=f"[{group.course.slug}] Group “{group.name}” {group.get_status_display()}",
            template="labs/email/group_reviewed.txt",
            context={"user": user, "group": group, "course": group.course},
        )
        for user in members
    ]
    if not messages:
        return 0
    return mail.mailers.default.send_messages(messages) or 0


def term_ending(*, course: Course, when: str) -> int:
    """Tell the members of the course's approved groups that the term ends on ``when``:
    their VMs are archived and removed then (labs/compute/term.py)."""
    from labs.choices import GroupStatus

    groups = course.groups.filter(status=GroupStatus.APPROVED)
    messages = [
        _message(
            to=m.user.email,
            subject=f"[{course.slug}] The term ends on {when}: copy what you need",
            template="labs/email/term_ending.txt",
            context={"user": m.user, "group": group, "course": course, "when": when},
        )
        for group in groups
        for m in group.memberships.select_related("user")
        if m.user.email
    ]
    if not messages:
        return 0
    return mail.mailers.default.send_messages(messages) or 0
