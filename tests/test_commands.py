"""Management commands: what an operator types and what they read back."""

import os
import stat
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import CommandError, call_command

from labs.choices import GroupStatus, OperationKind, OperationStatus, Role
from labs.models import Course, Group, Membership, Operation, Vm
from labs.people.groups import group_register
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


# load_demo ----------------------------------------------------------------------------------


@pytest.fixture
def demo_image(tmp_path) -> Path:
    """A tiny real qcow2 standing in for the demo's base image (nothing boots it here)."""
    path = tmp_path / "images" / "debian-12.qcow2"
    path.parent.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True, timeout=30
    )
    return path


def load_demo(image: Path, key: Path) -> str:
    out, _ = run("load_demo", "--image", str(image), "--key", str(key))
    return out


def printed_passwords(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {row[0]: row[1] for row in rows if len(row) == 3 and row[2].startswith("(")}


@pytest.mark.django_db
def test_load_demo_makes_an_approved_group_whose_vm_is_queued_for_the_worker(
    demo_image, tmp_path, django_capture_on_commit_callbacks
):
    key = tmp_path / "var" / "demo_key"

    with django_capture_on_commit_callbacks(execute=False) as sent:
        out = load_demo(demo_image, key)

    group = Group.objects.get(course__slug="demo-os")
    assert (group.name, group.status) == ("Demo group", GroupStatus.APPROVED)
    assert sorted(group.memberships.values_list("user__username", flat=True)) == ["alice", "bob"]
    [vm] = group.vms.all()
    assert (vm.host.name, vm.host.uri, vm.ssh_port) == ("local", "qemu:///system", 22000)
    [op] = vm.operations.all()
    assert (op.kind, op.status) == (OperationKind.PROVISION, OperationStatus.QUEUED)
    assert sent, "the provision is sent to the worker when the transaction commits"
    # The private key stays in its file, readable by its owner only; the group has its
    # public half.
    private = key.read_text()
    assert "PRIVATE KEY" in private
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert group.ssh_public_key.split()[:2] == key.with_suffix(".pub").read_text().split()[:2]
    assert private.strip() not in out and "PRIVATE KEY" not in out
    # What the newcomer reads: where to go, who to be, and the SSH line with the key.
    assert "sign in as alice" in out
    assert f"/groups/{group.pk}/" in out
    assert "Console" in out
    assert f"ssh -i {key} -p 22000 student@127.0.0.1" in out
    passwords = printed_passwords(out)
    assert set(passwords) == {"instructor", "alice", "bob", "carol", "dave"}
    assert User.objects.get(username="alice").check_password(passwords["alice"])


@pytest.mark.django_db
def test_load_demo_run_again_keeps_the_one_group_vm_and_key_and_changes_the_passwords(
    demo_image, tmp_path
):
    key = tmp_path / "demo_key"
    first = load_demo(demo_image, key)
    private = key.read_bytes()

    second = load_demo(demo_image, key)

    assert Group.objects.count() == 1
    assert Vm.objects.count() == 1
    assert Operation.objects.count() == 1
    assert key.read_bytes() == private
    assert Group.objects.get().status == GroupStatus.APPROVED
    assert "ssh -i" in second and "-p 22000 student@127.0.0.1" in second
    alice = User.objects.get(username="alice")
    assert alice.check_password(printed_passwords(second)["alice"])
    assert printed_passwords(first)["alice"] != printed_passwords(second)["alice"]


@pytest.mark.django_db
def test_load_demo_keeps_a_group_alice_signed_up_herself_and_says_so(
    demo_image, tmp_path, make_public_key
):
    run("load_demo")  # the course and its people, no machines
    course = Course.objects.get(slug="demo-os")
    group_register(
        course=course,
        by=User.objects.get(username="alice"),
        name="Alice's own",
        member_usernames=[],
        project_title="t",
        project_idea="i",
        ssh_public_key=make_public_key(),
    )

    out = load_demo(demo_image, tmp_path / "k1")

    assert list(Group.objects.values_list("name", flat=True)) == ["Alice's own"]
    assert "No demo group was created: Only students" not in out
    assert "No demo group was created" in out and "alice" in out


@pytest.mark.django_db
def test_load_demo_without_an_image_makes_people_but_no_group(tmp_path):
    out, _ = run("load_demo", "--key", str(tmp_path / "demo_key"))

    assert set(printed_passwords(out)) == {"instructor", "alice", "bob", "carol", "dave"}
    assert not Group.objects.exists()
    assert not (tmp_path / "demo_key").exists()


# register_host ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_register_host_checks_the_host_then_saves_it(tmp_path):
    from labs.models import Host, Image

    Image.objects.create(name="deb", os="Debian 12", path="/srv/images/debian-12.qcow2")
    out, _ = run(
        "register_host", "hv9", "--uri", "test:///default", "--storage-dir", str(tmp_path),
        "--ssh-ports", "23000-23099", "--memory-mib", "4096",
    )  # fmt: skip
    assert "hv9: libvirt" in out and "answers at test:///default" in out
    assert f"storage directory {tmp_path}: ready" in out
    assert "base image /srv/images/debian-12.qcow2: missing" in out
    host = Host.objects.get(name="hv9")
    assert (host.ssh_port_min, host.ssh_port_max, host.memory_mib) == (23000, 23099, 4096)
    assert "its worker serves host.hv9" in out
    # Published ports: the 1000 after the SSH range unless asked; an update keeps them.
    assert (host.published_port_min, host.published_port_max) == (23100, 24099)
    run(
        "register_host", "hv9", "--uri", "test:///default", "--storage-dir", str(tmp_path),
        "--ssh-ports", "23000-23049",
    )  # fmt: skip
    host.refresh_from_db()
    assert (host.ssh_port_max, host.published_port_min) == (23049, 23100)
    with pytest.raises(CommandError, match="Published ports are a range .* apart from the SSH"):
        run(
            "register_host", "hv9", "--uri", "test:///default", "--storage-dir", str(tmp_path),
            "--ssh-ports", "23000-23049", "--published-ports", "23040-23060",
        )  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--uri", "qemu+tcp://127.0.0.1:1/system"], "Host hv9 cannot hold VMs"),
        (["--uri", "qemu+tcp://hv9.example.edu/system"], "only a loopback test daemon"),
        (["--uri", "test:///default", "--ssh-ports", "22000-21000"], "SSH ports are a range"),
        (["--uri", "test:///default", "--ssh-ports", "many"], "--ssh-ports is MIN-MAX"),
        (
            [
                "--uri",
                "test:///default",
                "--console-ssh",
                "root@127.0.0.1:1",
                "--console-ssh-host-key",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA",
            ],
            "console channel does not work: console channel to root@127.0.0.1:1",
        ),
        (
            ["--uri", "test:///default", "--console-ssh", "hv9.example.edu"],
            "console channel does not work: console SSH address",
        ),
    ],
)
def test_register_host_saves_nothing_when_a_check_fails(arguments, message):
    from labs.models import Host

    with pytest.raises(CommandError, match=message):
        run("register_host", "hv9", *arguments)
    assert not Host.objects.exists()
