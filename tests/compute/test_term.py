"""The deadline and the end of term (labs/compute/term.py): final snapshots asked for by the
course clock, the students' refusals after the deadline, the warning mail, the archive on
libvirt's test driver (with a real qcow2 where the disk's volume says it is), the refusals
of restore_archive, and next term's course.

Time is travelled with time-machine; operations are asked for through dispatch (deliveries
recorded by the ``sent`` fixture) and run by the runner where the hypervisor matters.
"""

import json
import subprocess
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from celery import current_app
from django.core import mail
from django.core.management import CommandError, call_command
from django.urls import reverse

from labs.choices import (
    DesiredState,
    GroupStatus,
    ObservedState,
    OperationKind,
    OperationStatus,
    Role,
)
from labs.compute import requests, term
from labs.errors import Refused
from labs.models import (
    ClassHoliday,
    ClassSession,
    Course,
    Membership,
    Operation,
    Snapshot,
    Vm,
    VmArchive,
    VmTemplate,
)
from labs.people.groups import group_approve
from tests.compute.test_vms import host, image, make_host, run, template  # noqa: F401

pytestmark = pytest.mark.django_db

BERLIN = ZoneInfo("Europe/Berlin")
DEADLINE = datetime(2027, 1, 15, 17, 0, tzinfo=BERLIN)  # a Friday
TERM_ENDS = datetime(2027, 2, 12, 12, 0, tzinfo=BERLIN)


@pytest.fixture
def termed(course):
    Course.objects.filter(pk=course.pk).update(
        time_zone="Europe/Berlin", deadline_at=DEADLINE, term_ends_at=TERM_ENDS
    )
    course.refresh_from_db()
    return course


@pytest.fixture
def two_vms(termed, group_a, group_b, make_vm):
    """A running VM of group A, a stopped one of group B (rows only)."""
    return (
        make_vm(group_a, name="vm1"),
        make_vm(group_b, name="vm1", observed_state=ObservedState.SHUTOFF, ssh_port=30001),
    )


def tick(moment: datetime) -> list[Operation]:
    before = set(Operation.objects.values_list("pk", flat=True))
    with time_machine.travel(moment, tick=False):
        term.term_tick()
    return list(Operation.objects.exclude(pk__in=before).order_by("pk"))


def finish_snapshot(op: Operation) -> None:
    """What the snapshot executor records, without a hypervisor."""
    Operation.objects.filter(pk=op.pk).update(status=OperationStatus.SUCCEEDED)
    Snapshot.objects.create(
        vm=op.vm, name=op.params["name"], with_memory=op.params["with_memory"], final=True
    )


# --- the deadline ---------------------------------------------------------------------------


def test_nothing_is_asked_before_the_deadline(two_vms, sent):
    assert tick(DEADLINE - timedelta(minutes=1)) == []


def test_at_the_deadline_every_vm_is_asked_for_a_final_snapshot_once(two_vms, sent):
    running, stopped = two_vms
    ops = tick(DEADLINE + timedelta(seconds=30))
    assert [(op.vm, op.kind) for op in ops] == [
        (running, OperationKind.SNAPSHOT),
        (stopped, OperationKind.SNAPSHOT),
    ]
    assert ops[0].params == {
        "name": "final-2027-01-15",
        "with_memory": True,
        "clock": "deadline",
        "final": True,
    }
    assert ops[1].params["with_memory"] is False  # a stopped VM: disk only
    assert all(op.requested_by is None for op in ops)  # by the course clock
    # Queued still: a second tick asks for nothing more, and the deadline is not done.
    assert tick(DEADLINE + timedelta(minutes=1)) == []
    assert Course.objects.get(pk=two_vms[0].group.course_id).deadline_done_at is None


def test_a_busy_vm_gets_its_final_snapshot_on_a_later_tick_then_the_deadline_is_done(
    two_vms, sent, alice
):
    running, stopped = two_vms
    busy = Operation.objects.create(vm=running, kind=OperationKind.REBOOT, requested_by=alice)
    first = tick(DEADLINE + timedelta(minutes=1))
    assert [op.vm for op in first] == [stopped]
    finish_snapshot(first[0])
    Operation.objects.filter(pk=busy.pk).update(status=OperationStatus.SUCCEEDED)
    second = tick(DEADLINE + timedelta(minutes=2))
    assert [op.vm for op in second] == [running]
    finish_snapshot(second[0])
    tick(DEADLINE + timedelta(minutes=3))
    course = Course.objects.get(pk=running.group.course_id)
    assert course.deadline_done_at == DEADLINE + timedelta(minutes=3)
    assert tick(DEADLINE + timedelta(minutes=4)) == []


def test_a_students_snapshot_of_the_same_name_is_kept_and_the_final_one_named_apart(two_vms, sent):
    running, _ = two_vms
    Snapshot.objects.create(vm=running, name="final-2027-01-15", with_memory=False)
    ops = tick(DEADLINE + timedelta(minutes=1))
    assert ops[0].params["name"] == "final-2027-01-15-2"


def test_a_vm_whose_final_snapshot_failed_three_times_no_longer_holds_up_the_deadline(
    two_vms, sent
):
    running, stopped = two_vms
    Snapshot.objects.create(vm=stopped, name="final-2027-01-15", with_memory=False, final=True)
    for minute in range(1, 4):
        (op,) = tick(DEADLINE + timedelta(minutes=minute))
        Operation.objects.filter(pk=op.pk).update(status=OperationStatus.FAILED)
    assert tick(DEADLINE + timedelta(minutes=5)) == []
    assert Course.objects.get(pk=running.group.course_id).deadline_done_at is not None


def test_the_snapshot_executor_records_the_final_mark_on_the_test_driver(
    termed,
    group_a,
    ines,
    template,  # noqa: F811
    host,  # noqa: F811
    sent,
):
    group_approve(group=group_a, by=ines)
    vm = Vm.objects.get(group=group_a)
    assert run(vm.operations.get()).status == "succeeded"
    (op,) = tick(DEADLINE + timedelta(minutes=1))
    assert run(op).status == "succeeded", op.error
    snap = Snapshot.objects.get(vm=vm)
    assert (snap.name, snap.final, snap.with_memory) == ("final-2027-01-15", True, True)


# --- what students may ask for after the deadline --------------------------------------------


@pytest.mark.parametrize(
    ("who", "kind", "when", "refused"),
    [
        ("alice", OperationKind.RESET, "before", False),
        ("alice", OperationKind.RESET, "after", True),
        ("alice", OperationKind.REVERT, "after", True),
        ("alice", OperationKind.STOP, "after", False),
        ("alice", OperationKind.SNAPSHOT, "after", False),
        ("ines", OperationKind.RESET, "after", False),
        ("ines", OperationKind.REVERT, "after", False),
    ],
)
def test_after_the_deadline_only_staff_revert_or_reset(
    two_vms, sent, alice, ines, who, kind, when, refused
):
    vm, _ = two_vms
    Snapshot.objects.create(vm=vm, name="s1", with_memory=True)
    user = {"alice": alice, "ines": ines}[who]
    params = {"name": "s1"} if kind == OperationKind.REVERT else None
    moment = DEADLINE + (timedelta(minutes=1) if when == "after" else -timedelta(minutes=1))
    with time_machine.travel(moment, tick=False):
        if refused:
            with pytest.raises(Refused, match="deadline has passed: only the course's staff"):
                requests.vm_operation_request(vm=vm, kind=kind, by=user, params=params)
            assert not vm.operations.exists()
        else:
            assert requests.vm_operation_request(vm=vm, kind=kind, by=user, params=params)


def test_a_final_snapshot_is_deleted_by_staff_only(two_vms, sent, alice, ines):
    vm, _ = two_vms
    Snapshot.objects.create(vm=vm, name="final-2027-01-15", with_memory=True, final=True)
    Snapshot.objects.create(vm=vm, name="mine", with_memory=True)
    with pytest.raises(Refused, match="final snapshot taken at the project deadline"):
        requests.vm_operation_request(
            vm=vm,
            kind=OperationKind.SNAPSHOT_DELETE,
            by=alice,
            params={"name": "final-2027-01-15"},
        )
    op = requests.vm_operation_request(
        vm=vm, kind=OperationKind.SNAPSHOT_DELETE, by=alice, params={"name": "mine"}
    )
    Operation.objects.filter(pk=op.pk).update(status=OperationStatus.SUCCEEDED)
    assert requests.vm_operation_request(
        vm=vm, kind=OperationKind.SNAPSHOT_DELETE, by=ines, params={"name": "final-2027-01-15"}
    )


# --- the pages ------------------------------------------------------------------------------


def _page(client_for, user, vm) -> str:
    response = client_for(user).get(reverse("labs:group_detail", args=[vm.group_id]))
    assert response.status_code == 200
    return response.content.decode()


def test_the_group_page_says_when_the_final_snapshot_is_taken_in_the_course_zone(
    two_vms, client_for, alice
):
    with time_machine.travel(DEADLINE - timedelta(days=2), tick=False):
        page = _page(client_for, alice, two_vms[0])
    assert "Final snapshot at Fri 15 Jan 17:00" in page and "Europe/Berlin" in page
    assert "The term ends on" not in page  # not within the warning days yet


def test_after_the_deadline_a_student_is_offered_no_reset_revert_or_final_delete(
    two_vms, client_for, alice, ines
):
    vm, _ = two_vms
    Snapshot.objects.create(vm=vm, name="final-2027-01-15", with_memory=True, final=True)
    Snapshot.objects.create(vm=vm, name="mine", with_memory=True)
    before = _page(client_for, alice, vm)
    assert "Reset to baseline" in before
    with time_machine.travel(DEADLINE + timedelta(hours=1), tick=False):
        student = _page(client_for, alice, vm)
        staff = _page(client_for, ines, vm)
    assert "Reset to baseline" not in student and ">Revert<" not in student.replace(" ", "")
    # No form names the final snapshot for the student (neither delete nor revert);
    # "mine" can still be deleted.
    assert 'value="final-2027-01-15"' not in student and 'value="mine"' in student
    assert "The project deadline passed on Fri 15 Jan 17:00" in student
    assert "Reset to baseline" in staff and 'value="final-2027-01-15"' in staff


def test_the_course_overview_lists_each_groups_final_snapshot(two_vms, client_for, ines):
    vm, _ = two_vms
    Snapshot.objects.create(vm=vm, name="final-2027-01-15", with_memory=True, final=True)
    response = client_for(ines).get(reverse("labs:course_overview", args=[vm.group.course.slug]))
    page = response.content.decode()
    assert "Final snapshots" in page and "final-2027-01-15" in page and "Alpha" in page


def test_the_term_warning_is_shown_and_mailed_once_in_the_warning_days(
    two_vms, sent, client_for, alice
):
    with time_machine.travel(TERM_ENDS - timedelta(days=6), tick=False):
        page = _page(client_for, alice, two_vms[0])
        term.term_tick()
        term.term_tick()
    assert "The term ends on Fri 12 Feb 12:00: your VMs will be archived and removed then" in page
    to = sorted(address for message in mail.outbox for address in message.to)
    assert to == ["alice@example.edu", "bob@example.edu", "carol@example.edu"]  # once each
    assert "archived and removed" in mail.outbox[0].body
    assert Course.objects.get(pk=two_vms[0].group.course_id).term_warned_at is not None


# --- the end of term ------------------------------------------------------------------------


def test_at_the_end_of_term_every_live_vm_is_asked_to_archive_then_the_course_is_archived(
    two_vms, sent
):
    running, stopped = two_vms
    Course.objects.filter(pk=running.group.course_id).update(deadline_done_at=DEADLINE)
    assert tick(TERM_ENDS - timedelta(minutes=1)) == []
    ops = tick(TERM_ENDS + timedelta(minutes=1))
    archives = [op for op in ops if op.kind == OperationKind.ARCHIVE]
    assert {op.vm for op in archives} == {running, stopped}
    assert all(op.params == {"clock": "term"} and op.requested_by is None for op in archives)
    assert not [op for op in tick(TERM_ENDS + timedelta(minutes=2)) if op.kind == "archive"]
    Vm.objects.update(desired_state=DesiredState.DELETED)
    tick(TERM_ENDS + timedelta(minutes=3))
    assert Course.objects.get(pk=running.group.course_id).archived_at is not None


def _qcow2(path, *extra: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "64M"], check=True
    )


@pytest.fixture
def provisioned(termed, group_a, ines, template, host, settings, tmp_path, sent):  # noqa: F811
    """A VM provisioned on the test driver, a real standalone qcow2 at its disk's path."""
    settings.STRATUS_ARCHIVE_DIR = str(tmp_path / "archive")
    Course.objects.filter(pk=termed.pk).update(deadline_done_at=DEADLINE)  # snapshots taken
    group_approve(group=group_a, by=ines)
    vm = Vm.objects.get(group=group_a)
    assert run(vm.operations.get()).status == "succeeded"
    vm.refresh_from_db()
    disk = tmp_path / "h1" / "vms" / f"{vm.domain_name}.qcow2"
    _qcow2(disk)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(disk)],
        check=True,
        capture_output=True,
    )
    return vm


def _driver_has(vm) -> bool:
    from labs.compute.records import driver_of

    return str(vm.uuid) in driver_of(vm).states()


def test_the_archive_exports_a_standalone_qcow2_with_a_manifest_and_deletes_the_vm(
    provisioned, tmp_path
):
    vm = provisioned
    Snapshot.objects.create(vm=vm, name="final-2027-01-15", with_memory=True, final=True)
    (op,) = [o for o in tick(TERM_ENDS + timedelta(minutes=1)) if o.kind == "archive"]
    assert run(op).status == "succeeded", op.error
    archive = VmArchive.objects.get(vm=vm)
    path = tmp_path / "archive" / "os101" / "alpha-vm1.qcow2"
    assert archive.path == str(path) and path.is_file()
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert "backing-filename" not in info
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["sha256"] == archive.sha256 and manifest["vm"]["vcpus"] == 1
    assert [m["username"] for m in manifest["members"]] == ["alice", "bob"]
    assert manifest["snapshots"][0]["final"] is True and manifest["image"]["name"] == "deb"
    vm.refresh_from_db()
    assert (vm.desired_state, vm.observed_state, vm.ssh_port) == ("deleted", "deleted", None)
    assert not _driver_has(vm) and not Snapshot.objects.filter(vm=vm).exists()
    assert not list(path.parent.glob("*.partial"))


def test_a_failed_archive_leaves_the_vm_running_and_no_partial_file(provisioned, tmp_path):
    vm = provisioned
    (tmp_path / "h1" / "vms" / f"{vm.domain_name}.qcow2").unlink()  # nothing to export
    (op,) = [o for o in tick(TERM_ENDS + timedelta(minutes=1)) if o.kind == "archive"]
    outcome = runner_run_final(op)
    assert outcome == "failed" and "is not on this machine" in op.error
    vm.refresh_from_db()
    assert vm.desired_state != DesiredState.DELETED and vm.observed_state == "running"
    assert _driver_has(vm) and not VmArchive.objects.exists()
    assert not list((tmp_path / "archive").rglob("*.*"))


def runner_run_final(op) -> str:
    from labs.compute import runner

    outcome = runner.operation_run(operation_id=op.pk, worker="t/1", may_retry=False)
    op.refresh_from_db()
    return outcome.status


# --- restore_archive's refusals --------------------------------------------------------------


@pytest.fixture
def archived(provisioned, tmp_path):
    (op,) = [o for o in tick(TERM_ENDS + timedelta(minutes=1)) if o.kind == "archive"]
    assert run(op).status == "succeeded", op.error
    return VmArchive.objects.get(vm=provisioned)


def test_restore_refuses_a_missing_file(archived):
    from pathlib import Path

    Path(archived.path).unlink()
    with pytest.raises(CommandError, match="archive file .* is missing"):
        call_command("restore_archive", str(archived.pk))


def test_restore_refuses_a_file_that_does_not_match_its_checksum(archived):
    with open(archived.path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CommandError, match="does not match its checksum"):
        call_command("restore_archive", archived.path)
    assert Vm.objects.get(pk=archived.vm_id).desired_state == DesiredState.DELETED


def test_restore_refuses_a_qcow2_with_a_backing_file_even_with_its_checksum(archived, tmp_path):
    from pathlib import Path

    from labs.drivers.qcow2 import file_sha256

    Path(archived.path).unlink()
    _qcow2(Path(archived.path), "-b", "/etc/hostname", "-F", "raw", "-u")
    VmArchive.objects.filter(pk=archived.pk).update(sha256=file_sha256(archived.path))
    with pytest.raises(CommandError, match="names a backing file"):
        call_command("restore_archive", str(archived.pk))


def test_restore_refuses_a_name_taken_and_an_unknown_archive(archived):
    Vm.objects.filter(pk=archived.vm_id).update(desired_state=DesiredState.RUNNING)
    with pytest.raises(CommandError, match="already has a VM named vm1: choose another"):
        call_command("restore_archive", str(archived.pk))
    with pytest.raises(CommandError, match="No archive 999 is recorded"):
        call_command("restore_archive", "999")


# --- next term ------------------------------------------------------------------------------


def test_rollover_copies_the_setup_and_staff_but_no_groups_or_dates(
    termed,
    template,  # noqa: F811
    group_a,
    ines,
    tara,
    alice,  # noqa: F811
):
    Course.objects.filter(pk=termed.pk).update(snapshot_limit=4, idle_minutes=30)
    ClassSession.objects.create(
        course=termed, weekday=1, starts_at="10:00", ends_at="11:30", valid_until="2027-02-01"
    )
    ClassSession.objects.create(
        course=termed, date="2027-01-20", starts_at="10:00", ends_at="11:00"
    )
    ClassHoliday.objects.create(course=termed, first_day="2026-12-24", last_day="2027-01-06")
    call_command("rollover_course", "os101", "--new-slug", "os101-s27", "--term", "Spring 2027")
    new = Course.objects.get(slug="os101-s27")
    assert (new.term, new.rolled_over_from, new.title) == ("Spring 2027", termed, termed.title)
    assert (new.snapshot_limit, new.idle_minutes, new.time_zone) == (4, 30, "Europe/Berlin")
    assert new.deadline_at is None and new.term_ends_at is None and not new.groups.exists()
    copied = VmTemplate.objects.get(course=new)
    assert (copied.image, copied.quota_vms) == (template.image, template.quota_vms)
    assert [(s.weekday, s.valid_until) for s in new.class_sessions.all()] == [(1, None)]
    assert not ClassHoliday.objects.filter(course=new).exists()
    roles = dict(Membership.objects.filter(course=new).values_list("user__username", "role"))
    assert roles == {"ines": Role.INSTRUCTOR, "tara": Role.TA}
    assert VmTemplate.objects.get(course=termed).pk != copied.pk  # the old one stays


def test_rollover_refuses_a_slug_that_exists_and_makes_nothing(termed, other_course):
    before = Course.objects.count()
    with pytest.raises(CommandError, match="exists already"):
        call_command(
            "rollover_course", "os101", "--new-slug", other_course.slug, "--term", "Spring"
        )
    assert Course.objects.count() == before


def test_the_rollover_admin_action_is_for_superusers(termed, client, django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(root)
    url = reverse("admin:labs_course_changelist")
    response = client.post(
        url,
        {
            "action": "rollover",
            "_selected_action": [termed.pk],
            "new_slug": "os101-next",
            "term": "Spring 2027",
        },
    )
    assert response.status_code == 302
    assert Course.objects.get(slug="os101-next").rolled_over_from == termed


def test_the_term_tick_is_on_the_beat_every_minute():
    entry = current_app.conf.beat_schedule["term"]
    assert entry["task"] == "labs.tasks.term_tick" and entry["schedule"] == 60


def test_a_group_not_approved_gets_no_final_snapshot(termed, group_a, make_vm, sent):
    make_vm(group_a)
    type(group_a).objects.filter(pk=group_a.pk).update(status=GroupStatus.REJECTED)
    assert tick(DEADLINE + timedelta(minutes=1)) == []
