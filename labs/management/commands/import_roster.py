"""manage.py import_roster FILE.csv --course SLUG: create or update a course's people.

All or nothing: a file with any bad line is reported line by line and nothing is written.
"""

import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from labs.choices import Role
from labs.models import Course
from labs.people.roster import Outcome, RosterError, RosterReport, roster_import


class Command(BaseCommand):
    help = (
        "Create or update the users of a course from a CSV roster with the columns "
        "username,email[,first_name,last_name,role]. New accounts get an invitation email."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="the roster, a UTF-8 CSV file ('-' reads stdin)")
        parser.add_argument("--course", required=True, metavar="SLUG", help="the course")
        parser.add_argument(
            "--role",
            choices=Role.values,
            default=Role.STUDENT,
            help="role for rows without one in a role column (default: student)",
        )
        parser.add_argument(
            "--allow-account-changes",
            action="store_true",
            help="let the roster change the email or names of accounts it does not own: a "
            "superuser, someone on another course's roster or staff there, or an account "
            "that existed before this course named it. Without it such lines are refused "
            "and nothing is imported (adding those accounts to the course is always fine)",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="check the file and report what would change; write nothing, send nothing",
        )

    def handle(self, *args, **options) -> None:
        course = self.course_get(options["course"])
        data = self.file_read(options["file"])
        try:
            report = roster_import(
                course=course,
                data=data,
                default_role=options["role"],
                dry_run=options["dry_run"],
                allow_account_changes=options["allow_account_changes"],
            )
        except RosterError as error:
            for line in error.errors:
                self.stderr.write(line)
            bad = error.bad_lines
            raise CommandError(
                f"import aborted: {bad} bad line{'s' if bad != 1 else ''}; nothing was imported"
            ) from None
        self.report_write(report, verbosity=options["verbosity"])
        if report.invitation_error:
            raise CommandError(
                f"the roster was imported, but the invitation emails could not be sent "
                f"({report.invitation_error}). New users can ask for a link at "
                f"{settings.SITE_URL}/accounts/password_reset/"
            )

    def course_get(self, slug: str) -> Course:
        try:
            return Course.objects.get(slug=slug)
        except Course.DoesNotExist:
            known = ", ".join(Course.objects.values_list("slug", flat=True)[:20]) or "none yet"
            raise CommandError(
                f"no course with the slug '{slug}' (courses: {known}); "
                "create it with manage.py create_course"
            ) from None

    def file_read(self, name: str) -> bytes:
        if name == "-":
            return sys.stdin.buffer.read()
        path = Path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CommandError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise CommandError(f"{path} is a directory, not a CSV file") from None
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error.strerror or error}") from None

    def report_write(self, report: RosterReport, *, verbosity: int) -> None:
        for line in report.lines:
            if line.outcome == Outcome.UNCHANGED and verbosity < 2:
                continue
            if verbosity >= 1:
                detail = f" ({', '.join(line.changes)})" if line.changes else ""
                self.stdout.write(f"line {line.line}: {line.username} {line.outcome}{detail}")
        n = report.invited
        invitations = f"{n} invitation{'s' if n != 1 else ''}"
        summary = (
            f"created {report.created}, updated {report.updated}, unchanged {report.unchanged}; "
        )
        if report.dry_run:
            self.stdout.write(summary + f"{invitations} would be sent (dry run: nothing written)")
        else:
            self.stdout.write(self.style.SUCCESS(summary + f"{invitations} sent"))
