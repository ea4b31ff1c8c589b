"""Typed refusals: what services raise when they will not do what was asked.

Services raise these; views, the admin, consumers and (later) the API map them in one
place each (``labs.views.say_refusal``, ``labs.admin``, the consumers' close codes,
``http_status`` for an API). The message is for the person who asked: it names the
problem and what to do, and never a secret, a libvirt URI or another group's data.

Field-by-field checks of what a person typed into a form (a group signup, a course, a
roster) stay Django ``ValidationError``s, keyed by field, as forms expect them
(HackSoft's styleguide: ``ValidationError`` for forms and models, an application error
hierarchy for services).
"""

from django.core.exceptions import PermissionDenied, ValidationError


class StratusError(Exception):
    """A service refused; ``message`` says why, for the person who asked."""

    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def messages(self) -> list[str]:  # the shape of ValidationError.messages
        return [self.message]


class Invalid(StratusError):
    """The request's own parameters are unusable (a snapshot name with a slash)."""


class Refused(StratusError):
    """The request makes no sense in the object's current state (stop a stopped VM)."""

    http_status = 409


class Busy(Refused):
    """Another operation holds the object; the same request may work when it ends."""


class OverQuota(Refused):
    """The request would take the group past what it may use."""

    http_status = 422


class Unavailable(StratusError):
    """A service Stratus needs did not answer (Redis for console tickets): try later."""

    http_status = 503


class NotAllowed(StratusError, PermissionDenied):
    """The user may not do this (Django answers a PermissionDenied with 403 by itself)."""

    http_status = 403


def message_of(error: Exception) -> str:
    """One line for a flash message or an admin message, from any refusal.

    The one place that flattens a ValidationError's messages (field errors included).
    """
    if isinstance(error, StratusError):
        return error.message
    if isinstance(error, ValidationError):
        return " ".join(error.messages)
    return str(error)
