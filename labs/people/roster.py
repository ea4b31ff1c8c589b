"""Roster import: create or update a course's people from a CSV file, all or nothing.

The whole file is checked first and every bad line is reported; only a file without a
single error is written, in one transaction. New accounts get no password (an unusable
one) and an invitation email, sent once the transaction has committed, whose link lets
them choose their own. See docs/roster.md for the file format and the error messages.
"""

import codecs
import csv
import io
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator
from django.db import connection, transaction
from django.db.models import Q
from django.db.models.functions import Lower

from labs.choices import STAFF_ROLES, Role
from labs.models import Course, Membership
from labs.people import mail, revocation

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("username", "email")
OPTIONAL_COLUMNS = ("first_name", "last_name", "role")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
COLUMNS_TEXT = "username, email[, first_name, last_name, role]"
EXPECTED = f"expected {COLUMNS_TEXT}"

_username_validator = UnicodeUsernameValidator()
_email_validator = EmailValidator()
_SEPARATORS = re.compile(r"[\s\-]+")


class RosterError(Exception):
    """The roster has errors; nothing was written. Each of .errors begins "line N:"."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))

    @property
    def bad_lines(self) -> int:
        """How many distinct lines of the file have at least one error."""
        return len({error.split(":", 1)[0] for error in self.errors})


class Outcome(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class RosterLine:
    line: int
    username: str
    outcome: Outcome
    changes: tuple[str, ...] = ()  # what an update changed, e.g. ("email", "role: student → ta")


@dataclass
class RosterReport:
    dry_run: bool
    lines: list[RosterLine]
    invited: int  # new accounts that get (or, in a dry run, would get) an invitation
    # Set when the invitations could not be sent after the roster was committed.
    invitation_error: str | None = None

    def _count(self, outcome: Outcome) -> int:
        return sum(1 for line in self.lines if line.outcome == outcome)

    @property
    def created(self) -> int:
        return self._count(Outcome.CREATED)

    @property
    def updated(self) -> int:
        return self._count(Outcome.UPDATED)

    @property
    def unchanged(self) -> int:
        return self._count(Outcome.UNCHANGED)


def roster_import(
    *,
    course: Course,
    data: bytes,
    default_role: str = Role.STUDENT,
    dry_run: bool = False,
    allow_account_changes: bool = False,
) -> RosterReport:
    """Create or update the users and course memberships listed in a roster CSV.

    Raises RosterError listing every bad line; nothing is written then. With dry_run the
    same work is done and rolled back, and no email is sent.

    A roster never takes over an account: it does not change the email or names of a
    superuser, of anyone with a place in another course, or of an account that existed
    before this course's roster named it, unless ``allow_account_changes`` (an operator's
    explicit decision) says so. It may still add such an account to the course.
    """
    if default_role not in Role.values:
        raise ValueError(f"default_role must be one of {', '.join(Role.values)}")
    errors: list[tuple[int, str]] = []
    rows = _rows_read(text=_decode(data), default_role=default_role, errors=errors)
    with transaction.atomic():
        plan = _plan(
            course=course, rows=rows, errors=errors, allow_account_changes=allow_account_changes
        )
        if errors:
            errors.sort(key=lambda error: error[0])  # stable: a line's errors keep their order
            raise RosterError([f"line {line}: {message}" for line, message in errors])
        report = _apply(plan=plan, dry_run=dry_run)
        if dry_run:
            transaction.set_rollback(True)
        elif plan.new_users:
            transaction.on_commit(
                partial(_invite, report=report, users=plan.new_users, course=course)
            )
    return report


# Reading the file ------------------------------------------------------------------------


@dataclass
class _Row:
    line: int
    username: str
    email: str
    first_name: str | None  # None: no column or an empty cell, so keep what the user has
    last_name: str | None
    role: str


def _decode(data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Find every line that does not decode (a UTF-8 sequence never contains b"\n").
    errors = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            column = len(raw[: error.start].decode("utf-8")) + 1
            errors.append(
                f"line {number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                f"{column}) — save the file as UTF-8"
            )
    raise RosterError(errors)


def _records(text: str, errors: list[tuple[int, str]]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of each CSV record that is not blank."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            # The reader cannot find where the record ends: stop here.
            errors.append((start, f'cannot read the CSV ({error}); check the quotes (")'))
            return
        if any(cell.strip() for cell in cells):
            yield start, cells


def _header(*, line: int, cells: list[str]) -> list[str | None]:
    """Column names in order; None for a column without a name."""
    errors = []
    names: list[str | None] = []
    positions: dict[str, int] = {}
    for position, cell in enumerate(cells, start=1):
        given = cell.strip()
        name = _SEPARATORS.sub("_", given.lower())
        if not name:
            names.append(None)
            continue
        names.append(name)
        if name not in COLUMNS:
            hint = ""
            if ";" in given or "\t" in given:
                hint = " (separate the columns with commas, not semicolons or tabs)"
            errors.append(f"line {line}: unknown column '{given}'; {EXPECTED}{hint}")
        elif name in positions:
            errors.append(
                f"line {line}: column '{name}' appears twice "
                f"(columns {positions[name]} and {position})"
            )
        else:
            positions[name] = position
    for name in REQUIRED_COLUMNS:
        if name not in positions:
            errors.append(f"line {line}: missing column '{name}'; {EXPECTED}")
    if errors:
        raise RosterError(errors)
    return names


def _rows_read(*, text: str, default_role: str, errors: list[tuple[int, str]]) -> list[_Row]:
    """Rows that are well formed on their own; problems go to errors."""
    records = _records(text, errors)
    first = next(records, None)
    if first is None:
        if not errors:
            errors.append((1, f"the file is empty; it needs a header line: {COLUMNS_TEXT}"))
        raise RosterError([f"line {line}: {message}" for line, message in errors])
    header_line, header_cells = first
    header = _header(line=header_line, cells=header_cells)

    rows = []
    first_line_of: dict[str, dict[str, int]] = {"username": {}, "email": {}}
    for line, cells in records:
        found: list[str] = []
        values = _values(header=header, header_line=header_line, cells=cells, problems=found)
        row = _row_check(line=line, values=values, default_role=default_role, problems=found)
        if row is not None:
            for column, value in (("username", row.username), ("email", row.email)):
                earlier = first_line_of[column].setdefault(value.lower(), line)
                if earlier != line:
                    found.append(f"{column} '{_show(value)}' already on line {earlier}")
        errors.extend((line, problem) for problem in found)
        if row is not None and not found:
            rows.append(row)
    return rows


def _values(
    *, header: list[str | None], header_line: int, cells: list[str], problems: list[str]
) -> dict[str, str]:
    if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
        problems.append(
            f"{len(cells)} values, but the header on line {header_line} has "
            f"{len(header)} columns (a comma too many, or a value with a comma not in quotes?)"
        )
    values = {}
    for position, (name, cell) in enumerate(zip(header, cells, strict=False), start=1):
        if name is None:
            if cell.strip():
                problems.append(
                    f"value '{_show(cell.strip())}' in column {position}, "
                    "which has no name in the header"
                )
            continue
        values[name] = cell.strip()
    return values


def _row_check(
    *, line: int, values: dict[str, str], default_role: str, problems: list[str]
) -> _Row | None:
    User = get_user_model()
    before = len(problems)

    username = User.normalize_username(values.get("username", ""))
    username_limit = User._meta.get_field("username").max_length
    if not username:
        problems.append("username is missing")
    elif len(username) > username_limit:
        problems.append(
            f"username '{_show(username)}' is {len(username)} characters long; "
            f"at most {username_limit}"
        )
    elif not _valid(_username_validator, username):
        problems.append(
            f"username '{_show(username)}' is not valid: use only letters, digits "
            "and @ . + - _ (no spaces)"
        )

    email = User.objects.normalize_email(values.get("email", ""))
    email_limit = User._meta.get_field("email").max_length
    if not email:
        problems.append("email is missing")
    elif len(email) > email_limit:
        problems.append(
            f"email '{_show(email)}' is {len(email)} characters long; at most {email_limit}"
        )
    elif not _valid(_email_validator, email):
        problems.append(f"email '{_show(email)}' is not a valid email address")

    names = {}
    for column in ("first_name", "last_name"):
        value = values.get(column, "")
        limit = User._meta.get_field(column).max_length
        if len(value) > limit:
            problems.append(f"{column} is {len(value)} characters long; at most {limit}")
        names[column] = value or None

    role = values.get("role", "").lower() or default_role
    if role not in Role.values:
        problems.append(f"role '{_show(values['role'])}' is not one of {', '.join(Role.values)}")

    if len(problems) > before:
        return None
    return _Row(line=line, username=username, email=email, role=role, **names)


def _valid(validator: Callable[[str], None], value: str) -> bool:
    try:
        validator(value)
    except ValidationError:
        return False
    return True


def _show(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


# Checking against the database and planning the writes -----------------------------------


@dataclass
class _Plan:
    course: Course
    lines: list[RosterLine] = field(default_factory=list)
    new_users: list[AbstractUser] = field(default_factory=list)
    changed_users: list[AbstractUser] = field(default_factory=list)
    # (user, role) pairs: the user may be new, so it has no primary key yet.
    new_memberships: list[tuple[AbstractUser, str]] = field(default_factory=list)
    changed_memberships: list[Membership] = field(default_factory=list)


def _chunks(items: Sequence, params_per_item: int) -> Iterator[Sequence]:
    """Slices of items small enough for the database's limit on query parameters."""
    limit = connection.features.max_query_params
    size = max(1, (limit - 10) // params_per_item) if limit else max(1, len(items))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _existing_users(rows: list[_Row]) -> list[AbstractUser]:
    """Users matching any row by username or email, ignoring case (one query per ~8000 rows).

    Exact values are asked for as well: SQLite's LOWER() folds only ASCII letters.
    """
    User = get_user_model()
    users = {}  # by primary key: a user can match rows of two chunks
    for chunk in _chunks(rows, params_per_item=4):
        users.update(
            (user.pk, user)
            for user in User.objects.select_for_update()
            .annotate(lname=Lower("username"), lemail=Lower("email"))
            .filter(
                Q(username__in=[r.username for r in chunk])
                | Q(lname__in=[r.username.lower() for r in chunk])
                | Q(email__in=[r.email for r in chunk])
                | Q(lemail__in=[r.email.lower() for r in chunk])
            )
        )
    return list(users.values())


def _memberships(
    course: Course, user_ids: list[int]
) -> tuple[dict[int, Membership], dict[int, list[str]]]:
    """The users' memberships of this course (locked), and the roles they hold in other
    courses, in one query per chunk of users."""
    found, elsewhere = {}, {}
    for chunk in _chunks(user_ids, params_per_item=1):
        memberships = (
            Membership.objects.select_for_update(of=("self",))
            .filter(user_id__in=chunk)
            .select_related("group")
        )
        for membership in memberships:
            if membership.course_id == course.pk:
                found[membership.user_id] = membership
            else:
                elsewhere.setdefault(membership.user_id, []).append(membership.role)
    return found, elsewhere


def _plan(
    *,
    course: Course,
    rows: list[_Row],
    errors: list[tuple[int, str]],
    allow_account_changes: bool = False,
) -> _Plan:
    """What the import would do with each row, and every line's error, before any write.

    One function rather than several on purpose: each check reads the same lookups (users
    by name and email, memberships), and every error must be found in this one pass so
    that the whole file is reported at once and nothing is written unless all is well.
    """
    User = get_user_model()
    users = _existing_users(rows)
    by_username = {user.username: user for user in users}
    by_lower: dict[str, list[AbstractUser]] = {}
    by_email: dict[str, list[AbstractUser]] = {}
    for user in users:
        by_lower.setdefault(user.username.lower(), []).append(user)
        if user.email:
            by_email.setdefault(user.email.lower(), []).append(user)

    matched: dict[int, AbstractUser] = {}  # row line → existing user
    rejected: set[int] = set()
    for row in rows:
        user = by_username.get(row.username)
        if user is None and (others := by_lower.get(row.username.lower())):
            errors.append(
                (
                    row.line,
                    f"'{row.username}' clashes with existing user '{others[0].username}' "
                    "(usernames are compared without case)",
                )
            )
            rejected.add(row.line)
            continue
        owners = [
            u for u in by_email.get(row.email.lower(), []) if user is None or u.pk != user.pk
        ]
        if owners:
            errors.append(
                (
                    row.line,
                    f"email '{_show(row.email)}' is already used by existing user "
                    f"'{owners[0].username}'",
                )
            )
            rejected.add(row.line)
            continue
        if user is not None:
            matched[row.line] = user
    memberships, elsewhere = _memberships(course, [user.pk for user in matched.values()])

    plan = _Plan(course=course)
    for row in rows:
        if row.line in rejected:
            continue
        user = matched.get(row.line)
        if user is None:
            user = User(
                username=row.username,
                email=row.email,
                first_name=row.first_name or "",
                last_name=row.last_name or "",
                is_staff=row.role in STAFF_ROLES,
            )
            user.set_unusable_password()
            plan.new_users.append(user)
            plan.new_memberships.append((user, row.role))
            plan.lines.append(RosterLine(row.line, row.username, Outcome.CREATED))
            continue

        if (
            not allow_account_changes
            and (why := _not_ours(user, memberships.get(user.pk), elsewhere.get(user.pk)))
            and (touched := _account_changes(user=user, row=row))
        ):
            errors.append(
                (
                    row.line,
                    f"'{user.username}' is {why}: this roster does not change their "
                    f"{' or '.join(touched)} (--allow-account-changes does, if you mean it)",
                )
            )
            continue
        changes = _user_update(user=user, row=row)
        if changes:
            plan.changed_users.append(user)
        membership = memberships.get(user.pk)
        if membership is None:
            plan.new_memberships.append((user, row.role))
            changes.append(f"added to {course.slug} as {row.role}")
        elif membership.role != row.role:
            if membership.group_id is not None and row.role != Role.STUDENT:
                errors.append(
                    (
                        row.line,
                        f"'{user.username}' is in group '{membership.group.name}', and only "
                        f"students can be in a group: cannot make them {row.role} "
                        "(take them out of the group first)",
                    )
                )
                continue
            changes.append(f"role: {membership.role} → {row.role}")
            membership.role = row.role
            plan.changed_memberships.append(membership)
        outcome = Outcome.UPDATED if changes else Outcome.UNCHANGED
        plan.lines.append(RosterLine(row.line, user.username, outcome, tuple(changes)))
    return plan


def _not_ours(user: AbstractUser, here: Membership | None, roles_elsewhere) -> str:
    """Why this course's roster must not change the account's identity ("" if it may)."""
    if user.is_superuser:
        return "a superuser"
    if roles_elsewhere and any(role in STAFF_ROLES for role in roles_elsewhere):
        return "staff of another course"
    if roles_elsewhere:
        return "on another course's roster"
    if here is None:
        return "an account this course's roster did not create"
    return ""


def _account_changes(*, user: AbstractUser, row: _Row) -> list[str]:
    """Which of email and names the row would change."""
    wanted = {"email": row.email, "first_name": row.first_name, "last_name": row.last_name}
    labels = {"email": "email", "first_name": "first name", "last_name": "last name"}
    return [
        labels[name]
        for name, value in wanted.items()
        if value is not None and getattr(user, name) != value
    ]


def _user_update(*, user: AbstractUser, row: _Row) -> list[str]:
    """Bring an existing user's fields in line with the row; returns what changed."""
    changes = []
    wanted = {"email": row.email, "first_name": row.first_name, "last_name": row.last_name}
    for name, value in wanted.items():
        if value is not None and getattr(user, name) != value:
            setattr(user, name, value)
            changes.append(name)
    # Course staff review groups in the admin. Staff access is only ever granted here,
    # never taken away: the user may be staff for another reason.
    if row.role in STAFF_ROLES and not user.is_staff:
        user.is_staff = True
        changes.append("staff access")
    return changes


# Writing ----------------------------------------------------------------------------------


def _apply(*, plan: _Plan, dry_run: bool) -> RosterReport:
    User = get_user_model()
    if plan.new_users:
        User.objects.bulk_create(plan.new_users)
        if any(user.pk is None for user in plan.new_users):  # backends without RETURNING
            pks = dict(
                User.objects.filter(username__in=[u.username for u in plan.new_users]).values_list(
                    "username", "pk"
                )
            )
            for user in plan.new_users:
                user.pk = pks[user.username]
    if plan.changed_users:
        User.objects.bulk_update(
            plan.changed_users, ["email", "first_name", "last_name", "is_staff"]
        )
    if plan.new_memberships:
        Membership.objects.bulk_create(
            Membership(course=plan.course, user=user, role=role)
            for user, role in plan.new_memberships
        )
    if plan.changed_memberships:
        Membership.objects.bulk_update(plan.changed_memberships, ["role"])
        # bulk_update sends no post_save: say it, so their consoles and pages re-check.
        revocation.roles_changed.send(
            sender=Membership, user_ids=[m.user_id for m in plan.changed_memberships]
        )
    plan.lines.sort(key=lambda line: line.line)
    return RosterReport(dry_run=dry_run, lines=plan.lines, invited=len(plan.new_users))


def _invite(*, report: RosterReport, users: list[AbstractUser], course: Course) -> None:
    """Runs after commit: the accounts exist whether or not the mail server answers."""
    try:
        mail.invitations(users=users, course=course)
    except OSError as error:  # smtplib.SMTPException is an OSError
        logger.exception("roster %s: invitation emails not sent", course.slug)
        report.invitation_error = str(error) or type(error).__name__
