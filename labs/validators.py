"""Validators for what people type, shared by models, forms and services."""

import unicodedata

from django.core.exceptions import ValidationError

# Controls (Cc), format characters (Cf: bidi overrides and isolates, zero-width joiners),
# line and paragraph separators: none belongs in a one-line name, where they could forge
# a line in a log or an email header, or turn what a reviewer reads around.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def one_line_text(value: str) -> None:
    """A one-line text field: no control or direction-changing character."""
    for char in value or "":
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise ValidationError(
                "Use one line of plain text: U+%(point)04X (a control or direction-changing "
                "character) is not allowed here.",
                code="control_character",
                params={"point": ord(char)},
            )


def time_zone_name(value: str) -> None:
    """An IANA time zone name that this machine's zoneinfo knows ("Europe/Berlin")."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            "“%(value)s” is not a time zone name; use an IANA name such as Europe/Berlin or "
            "America/New_York.",
            code="time_zone",
            params={"value": value},
        ) from None
