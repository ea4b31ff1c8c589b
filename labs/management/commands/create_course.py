"""manage.py create_course SLUG --title "…": add a course from the shell."""

from datetime import datetime

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from labs.models import Course
from labs.people.courses import course_create


def parse_when(value: str, *, option: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is in settings.TIME_ZONE.

    A bare date means midnight at the start of that day.
    """
    text = value.strip()
    try:
        when = parse_datetime(text)
        if when is None and (day := parse_date(text)) is not None:
            when = datetime(day.year, day.month, day.day)
    except ValueError as error:  # well formed but impossible, e.g. 2026-02-30
        raise CommandError(f"{option}: {value!r} is not a valid date ({error})") from None
    if when is None:
        raise CommandError(
            f"{option}: {value!r} is not an ISO 8601 date or date-time "
            "(e.g. 2026-09-01 or 2026-09-01T09:00 or 2026-09-01T09:00+02:00)"
        )
    if timezone.is_naive(when):
        when = timezone.make_aware(when)
    return when


class Command(BaseCommand):
    help = "Create a course. Dates are ISO 8601; without an offset they use TIME_ZONE."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="short name used in URLs, e.g. os101")
        parser.add_argument("--title", required=True, help="the course's full title")
        parser.add_argument("--term", default="", help='e.g. "Fall 2026"')
        parser.add_argument(
            "--max-group-size", type=int, default=4, help="members per group, 1-50 (default 4)"
        )
        parser.add_argument("--signup-opens", metavar="ISO", help="when group signup opens")
        parser.add_argument("--signup-closes", metavar="ISO", help="when group signup closes")

    def handle(self, *args, **options) -> None:
        opens = options["signup_opens"]
        closes = options["signup_closes"]
        try:
            course = course_create(
                slug=options["slug"],
                title=options["title"],
                term=options["term"],
                max_group_size=options["max_group_size"],
                signup_opens_at=parse_when(opens, option="--signup-opens") if opens else None,
                signup_closes_at=(
                    parse_when(closes, option="--signup-closes") if closes else None
                ),
            )
        except ValidationError as error:
            raise CommandError(_describe(error)) from None
        self.stdout.write(self.style.SUCCESS(f"Created course {course.slug}: {course.title}"))
        self.stdout.write(_summary(course))


_OPTION_FOR_FIELD = {
    "slug": "SLUG",
    "title": "--title",
    "term": "--term",
    "max_group_size": "--max-group-size",
    "signup_opens_at": "--signup-opens",
    "signup_closes_at": "--signup-closes",
}


def _describe(error: ValidationError) -> str:
    lines = []
    by_field = error.message_dict
    # In the order of the command line, then anything else (e.g. "__all__").
    for field in [*_OPTION_FOR_FIELD, *(f for f in by_field if f not in _OPTION_FOR_FIELD)]:
        label = _OPTION_FOR_FIELD.get(field, field)
        lines.extend(f"{label}: {message}" for message in by_field.get(field, []))
    return "course not created:\n  " + "\n  ".join(lines)


def _summary(course: Course) -> str:
    def when(value: datetime | None, otherwise: str) -> str:
        return timezone.localtime(value).isoformat() if value else otherwise

    return "\n".join(
        [
            f"  term:        {course.term or '(none)'}",
            f"  group size:  up to {course.max_group_size}",
            f"  signup from: {when(course.signup_opens_at, 'now (no start)')}",
            f"  signup to:   {when(course.signup_closes_at, 'never closes')}",
        ]
    )
