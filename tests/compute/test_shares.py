"""Shared files (labs/compute/shares.py): the domain XML and the seed of a VM with shares,
VMs provisioned on libvirt's test driver with and without them, what a VM with shares
refuses (suspend to disk, a snapshot while running, a live move) and what the clock does
instead, the group share in the disk quota, and the course share's puts (names, sizes,
the cap, symlinks, all or nothing). The guest's side: tests/integration/
test_shares_on_a_guest.py."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import io
import os
import stat
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command

from labs.choices import ObservedState, OperationKind
from labs.compute import idle, moves, quotas, requests, shares, usage
from labs.drivers.registry import driver_for
from labs.errors import Invalid, NotAllowed, Refused
from labs.models import Course, Operation, Vm
from tests.compute.test_vms import approve, host, image, make_host, run, template  # noqa: F401

pytestmark = pytest.mark.django_db


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test or libvirt's test driver made


@pytest.fixture(autouse=True)
def shares_dir(settings, tmp_path):
    settings.STRATUS_SHARES_DIR = str(tmp_path / "shares")
    settings.COURSE_SHARE_CAP_MIB = 2
    settings.SHARE_FILE_MAX_MIB = 1
    return tmp_path / "shares"


@pytest.fixture
def with_shares(course):
    Course.objects.filter(pk=course.pk).update(shares=True)
    course.refresh_from_db()
    return course


def domain_of(vm) -> ET.Element:
    return parse(driver_for(vm.host)._conn.lookupByName(vm.domain_name).XMLDesc(0))


# --- VMs on the test driver -------------------------------------------------------------------


def test_a_vm_of_a_course_with_shares_is_provisioned_with_both(
    with_shares, group_a, ines, template, host
):
    [vm] = approve(group_a, ines)
    assert run(vm.operations.get()).status == "succeeded"
    vm.refresh_from_db()
    assert vm.shares is True
    sources = {
        fs.find("target").get("dir"): fs.find("source").get("dir")
        for fs in domain_of(vm).findall("devices/filesystem")
    }
    assert sources == {
        "group": shares.group_share_dir(group_a),
        "course": os.path.join(shares.course_share_dir(with_shares), "ro"),
    }


def test_a_vm_of_a_course_without_shares_has_none(group_a, ines, template, host):
    [vm] = approve(group_a, ines)
    assert run(vm.operations.get()).status == "succeeded"
    vm.refresh_from_db()
    assert vm.shares is False and domain_of(vm).find("devices/filesystem") is None


@pytest.fixture
def shared_vm(with_shares, group_a, ines, template, host):
    [vm] = approve(group_a, ines)
    assert run(vm.operations.get()).status == "succeeded"
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING and vm.shares
    return vm


def test_a_vm_with_shares_refuses_a_suspend_to_disk_naming_the_shares(shared_vm, alice):
    with pytest.raises(Refused, match="shared folders .* cannot save to disk: shut it down"):
        requests.vm_operation_request(vm=shared_vm, kind=OperationKind.SAVE, by=alice)
    assert not Operation.objects.filter(vm=shared_vm, kind=OperationKind.SAVE).exists()


def test_a_running_vm_with_shares_refuses_a_snapshot_but_a_stopped_one_takes_it(shared_vm, alice):
    with pytest.raises(Refused, match="shut it down for a disk-only snapshot"):
        requests.vm_operation_request(
            vm=shared_vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s1"}
        )
    off = requests.vm_operation_request(vm=shared_vm, kind=OperationKind.FORCE_OFF, by=alice)
    assert run(off).status == "succeeded"
    shared_vm.refresh_from_db()
    snap = requests.vm_operation_request(
        vm=shared_vm, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s1"}
    )
    assert run(snap).status == "succeeded", snap.error


def test_a_running_vm_with_shares_is_not_moved_live(shared_vm, ines, tmp_path):
    other = make_host("h2", tmp_path=tmp_path / "h2")
    with pytest.raises(Refused, match="shared folders .* cannot migrate: shut it down"):
        moves.vm_move_request(vm=shared_vm, to=other, by=ines)


def test_the_clock_shuts_a_vm_with_shares_down_where_it_would_save_it(shared_vm):
    assert shares.save_kind(shared_vm) == OperationKind.STOP
    vm = Vm.objects.select_related("group__course").get(pk=shared_vm.pk)
    Vm.objects.filter(pk=vm.pk).update(shares=False)
    vm.refresh_from_db()
    assert shares.save_kind(vm) == OperationKind.SAVE


def test_the_usage_hours_shut_down_a_vm_with_shares_out_of_hours(shared_vm, sent):
    vm = Vm.objects.select_related("group__course").get(pk=shared_vm.pk)
    op = usage._vm_save(vm)
    assert op is not None and op.kind == OperationKind.STOP


def test_the_idle_clock_shuts_down_an_idle_vm_with_shares(shared_vm, sent):
    vm = Vm.objects.select_related("group__course").get(pk=shared_vm.pk)
    op = idle._act(vm, idle_for=timedelta(hours=1))
    assert op is not None and op.kind == OperationKind.STOP


def test_the_deadline_shuts_a_running_vm_with_shares_down_before_its_disk_only_snapshot(
    shared_vm, sent
):
    from datetime import datetime

    import time_machine

    from labs.compute import term

    deadline = datetime(2027, 1, 15, 17, 0, tzinfo=term.timezone.get_current_timezone())
    Course.objects.filter(pk=shared_vm.group.course_id).update(deadline_at=deadline)
    with time_machine.travel(deadline + timedelta(seconds=30), tick=False):
        term.term_tick()
    [op] = Operation.objects.filter(vm=shared_vm, params__clock="deadline")
    assert op.kind == OperationKind.STOP
    assert run(op).status == "succeeded"
    with time_machine.travel(deadline + timedelta(minutes=2), tick=False):
        term.term_tick()
    snap = Operation.objects.get(vm=shared_vm, kind=OperationKind.SNAPSHOT)
    assert snap.params["with_memory"] is False and snap.params["final"] is True


# --- the quota -------------------------------------------------------------------------------


def test_the_group_share_counts_against_the_disk_quota(shared_vm, shares_dir):
    before = quotas.group_usage(group=shared_vm.group)["disk_gib"]
    directory = shares.group_share_dir(shared_vm.group)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "data.bin"), "wb") as f:
        f.write(os.urandom(1024 * 1024))  # 1 MiB written: 1 GiB of quota (whole GiB)
    os.symlink("/usr", os.path.join(directory, "usr"))  # a guest's symlink: not followed
    assert quotas.group_usage(group=shared_vm.group)["disk_gib"] == before + 1
    assert shares.directory_bytes(directory) < 2 * 1024 * 1024


# --- the course share --------------------------------------------------------------------------


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def put(course, by, *files):
    return shares.course_share_put(
        course=course,
        uploads=[shares.Upload(name=n, data=io.BytesIO(d), size=len(d)) for n, d in files],
        by=by,
    )


def test_an_instructor_puts_files_into_the_course_share(with_shares, ines):
    assert put(with_shares, ines, ("notes.txt", b"hello"), ("lab1.tar.gz", b"x" * 10)) == [
        "notes.txt",
        "lab1.tar.gz",
    ]
    files = shares.course_files_dir(with_shares)
    assert read(os.path.join(files, "notes.txt")) == b"hello"
    assert stat.S_IMODE(os.stat(os.path.join(files, "notes.txt")).st_mode) == 0o644
    assert shares.course_share_files(course=with_shares) == [("lab1.tar.gz", 10), ("notes.txt", 5)]
    put(with_shares, ines, ("notes.txt", b"v2"))  # replaced
    assert read(os.path.join(files, "notes.txt")) == b"v2"


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a/b", ".hidden", "..", "", "with space", "x" * 129, ".put-1"]
)
def test_a_file_name_with_a_path_or_a_leading_dot_is_refused(with_shares, ines, name):
    with pytest.raises(Invalid, match="not a file name the course share takes"):
        put(with_shares, ines, (name, b"x"))
    assert shares.course_share_files(course=with_shares) == []


def test_a_too_large_file_is_refused_and_nothing_of_the_batch_is_put(with_shares, ines):
    with pytest.raises(Refused, match="at most 1 MiB"):
        put(with_shares, ines, ("ok.txt", b"x"), ("big.bin", b"x" * (1024 * 1024 + 1)))
    assert shares.course_share_files(course=with_shares) == []


def test_a_file_longer_than_it_said_is_refused_while_it_is_copied(with_shares, ines):
    upload = shares.Upload(name="liar.bin", data=io.BytesIO(b"x" * (1024 * 1024 + 1)), size=3)
    with pytest.raises(Refused, match="larger than 1 MiB"):
        shares.course_share_put(course=with_shares, uploads=[upload], by=ines)
    assert os.listdir(shares.course_files_dir(with_shares)) == []  # no temporary file left


def test_the_course_share_cap_is_kept(with_shares, ines):
    put(with_shares, ines, ("a.bin", b"x" * 1024 * 1000), ("b.bin", b"x" * 1024 * 1000))
    with pytest.raises(Refused, match="more than 2 MiB"):
        put(with_shares, ines, ("c.bin", b"x" * 1024 * 200))


def test_a_symlink_in_the_course_share_is_replaced_never_followed(with_shares, ines, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    files = shares.course_files_dir(with_shares)
    os.makedirs(files)
    os.symlink(outside, os.path.join(files, "notes.txt"))
    put(with_shares, ines, ("notes.txt", b"new"))
    assert outside.read_bytes() == b"keep me"
    assert not os.path.islink(os.path.join(files, "notes.txt"))


def test_a_course_directory_that_is_a_symlink_is_refused(with_shares, ines, tmp_path, shares_dir):
    os.makedirs(shares_dir)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", shares.course_share_dir(with_shares))
    with pytest.raises(Refused, match="not a directory"):
        put(with_shares, ines, ("notes.txt", b"x"))
    assert os.listdir(tmp_path / "elsewhere") == []


def test_only_the_courses_instructors_put_files(with_shares, alice, tara, olga):
    for user in (alice, tara, olga):
        with pytest.raises(NotAllowed):
            put(with_shares, user, ("notes.txt", b"x"))


def test_the_command_puts_files_and_refuses_a_bad_one_clearly(with_shares, tmp_path):
    good = tmp_path / "handout.pdf"
    good.write_bytes(b"%PDF")
    call_command("course_share_put", with_shares.slug, str(good))
    assert shares.course_share_files(course=with_shares) == [("handout.pdf", 4)]
    with pytest.raises(CommandError, match="is not a regular file"):
        call_command("course_share_put", with_shares.slug, str(tmp_path))
    with pytest.raises(CommandError, match="No course"):
        call_command("course_share_put", "nope", str(good))
    call_command("course_share_put", with_shares.slug, "--remove", "handout.pdf")
    assert shares.course_share_files(course=with_shares) == []
