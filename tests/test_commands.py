"""Management commands: what an operator types and what they read back."""

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import CommandError, call_command

from labs.choices import Role
from labs.models import Course, Membership
from tests.conftest import child_db_env

User = get_user_model()


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def roster_file(tmp_path):
    def write(*lines: str, header: str = "username,email,first_name,last_name,role") -> Path:
        path = tmp_path / "roster.csv"
        path.write_text("\n".join([header, *lines, ""]), encoding="utf-8")
        return path

    return write


# create_course ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_course_creates_the_course_and_says_what_it_made():
    out, _ = run(
        "create_course",
        "os101",
        "--title",
        "Operating Systems",
        "--term",
        "Fall 2026",
        "--max-group-size",
        "3",
        "--signup-opens",
        "2026-09-01T09:00:00+02:00",
        "--signup-closes",
        "2026-09-15",
    )

    course = Course.objects.get(slug="os101")
    assert (course.title, course.term, course.max_group_size) == (
        "Operating Systems",
        "Fall 2026",
        3,
    )
    assert course.signup_opens_at.isoformat() == "2026-09-01T07:00:00+00:00"
    assert course.signup_closes_at.isoformat() == "2026-09-15T00:00:00+00:00"  # TIME_ZONE=UTC
    assert "Created course os101: Operating Systems" in out
    assert "up to 3" in out
    assert "2026-09-15T00:00:00+00:00" in out


@pytest.mark.django_db
def test_create_course_without_dates_leaves_signup_always_open():
    out, _ = run("create_course", "os101", "--title", "Operating Systems")

    course = Course.objects.get(slug="os101")
    assert course.signup_opens_at is None and course.signup_closes_at is None
    assert "never closes" in out


@pytest.mark.django_db
def test_create_course_refuses_a_taken_slug(course):
    with pytest.raises(CommandError, match="SLUG: A course with the slug “os101” already exists"):
        run("create_course", "os101", "--title", "Another")

    assert Course.objects.get().title == "Operating Systems"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-group-size", "0"], "--max-group-size: A group has between 1 and 50 members"),
        (["--signup-opens", "next monday"], "--signup-opens: 'next monday' is not an ISO 8601"),
        (["--signup-closes", "2026-02-30"], "--signup-closes: '2026-02-30' is not a valid date"),
        (
            ["--signup-opens", "2026-09-15", "--signup-closes", "2026-09-01"],
            "--signup-closes: Signup must close after it opens",
        ),
    ],
)
def test_create_course_names_the_option_with_a_bad_value(options, message):
    with pytest.raises(CommandError) as raised:
        run("create_course", "os101", "--title", "Operating Systems", *options)

    assert message in str(raised.value)
    assert not Course.objects.exists()


# import_roster ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_import_roster_prints_the_summary_and_sends_the_invitations(
    course, dave, roster_file, django_capture_on_commit_callbacks
):
    path = roster_file(
        "alice,alice@example.edu,Alice,Adams,",
        "bob,bob@example.edu,Bob,Brown,",
        "ines,ines@example.edu,Ines,Ito,instructor",
        "dave,dave.diaz@example.edu,,,",
    )

    with django_capture_on_commit_callbacks(execute=True):
        out, err = run("import_roster", str(path), "--course", "os101")

    assert out.splitlines() == [
        "line 2: alice created",
        "line 3: bob created",
        "line 4: ines created",
        "line 5: dave updated (email)",
        "created 3, updated 1, unchanged 0; 3 invitations sent",
    ]
    assert err == ""
    assert len(mail.outbox) == 3
    assert Membership.objects.get(user__username="ines").role == Role.INSTRUCTOR


@pytest.mark.django_db
def test_import_roster_applies_the_role_option_to_rows_without_a_role(course, roster_file):
    path = roster_file("tom,tom@example.edu", header="username,email")

    run("import_roster", str(path), "--course", "os101", "--role", "ta")

    assert Membership.objects.get(user__username="tom").role == Role.TA
    assert User.objects.get(username="tom").is_staff


@pytest.mark.django_db
def test_import_roster_run_twice_reports_everyone_unchanged(course, roster_file):
    path = roster_file("alice,alice@example.edu", "bob,bob@example.edu")
    run("import_roster", str(path), "--course", "os101")

    out, _ = run("import_roster", str(path), "--course", "os101")

    assert out.strip() == "created 0, updated 0, unchanged 2; 0 invitations sent"


@pytest.mark.django_db
def test_import_roster_dry_run_writes_nothing_and_says_so(
    course, roster_file, django_capture_on_commit_callbacks
):
    path = roster_file("alice,alice@example.edu", "bob,bob@example.edu")

    with django_capture_on_commit_callbacks(execute=True):
        out, _ = run("import_roster", str(path), "--course", "os101", "--dry-run")

    assert out.splitlines()[-1] == (
        "created 2, updated 0, unchanged 0; 2 invitations would be sent (dry run: nothing written)"
    )
    assert not User.objects.exists()
    assert mail.outbox == []


@pytest.mark.django_db
def test_import_roster_prints_every_bad_line_and_imports_nothing(course, roster_file):
    path = roster_file(
        "alice,alice@example.edu",
        "bad name,bad@example.edu",
        "carl,carl@example.edu,,,boss",
        "carl2,not-an-address",
    )

    out = StringIO()
    err = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("import_roster", str(path), "--course", "os101", stdout=out, stderr=err)

    assert str(raised.value) == "import aborted: 3 bad lines; nothing was imported"
    lines = err.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["line 3", "line 4", "line 5"]
    assert "role 'boss' is not one of student, ta, instructor" in lines[1]
    assert not User.objects.exists()


@pytest.mark.django_db
def test_import_roster_needs_an_existing_file(course, tmp_path):
    with pytest.raises(CommandError, match="no such file: .*missing.csv"):
        run("import_roster", str(tmp_path / "missing.csv"), "--course", "os101")


@pytest.mark.django_db
def test_import_roster_needs_an_existing_course(course, roster_file):
    path = roster_file("alice,alice@example.edu")

    with pytest.raises(CommandError, match=r"no course with the slug 'cs999' \(courses: os101\)"):
        run("import_roster", str(path), "--course", "cs999")


@pytest.mark.django_db
def test_import_roster_rejects_an_unknown_role_option(course, roster_file):
    path = roster_file("alice,alice@example.edu")

    with pytest.raises(CommandError, match="invalid choice: 'boss'"):
        run("import_roster", str(path), "--course", "os101", "--role", "boss")


# Exit status, from a real shell ---------------------------------------------------------------


def manage(*args: str) -> subprocess.CompletedProcess:
    """Run manage.py in a child process against the test database."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "SECRET_KEY"}
    }
    env.update(
        **child_db_env(),
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        PYTHONWARNINGS="ignore",
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args, "--skip-checks"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_import_roster_exits_non_zero_on_a_bad_file_and_zero_on_a_good_one(course, roster_file):
    bad = manage("import_roster", str(roster_file("bad name,x@example.edu")), "--course", "os101")

    assert bad.returncode == 1
    assert "line 2: username 'bad name' is not valid" in bad.stderr
    assert "import aborted: 1 bad line; nothing was imported" in bad.stderr
    assert not User.objects.exists()

    good = manage("import_roster", str(roster_file("ann,ann@example.edu")), "--course", "os101")

    assert good.returncode == 0, good.stderr
    assert "created 1, updated 0, unchanged 0; 1 invitation sent" in good.stdout
    assert User.objects.filter(username="ann").exists()
