"""Bulk operations for a course's staff: one Operation per VM that can take it, the rest
skipped with a reason and left alone, never a VM of another course."""

import pytest
from django.core.exceptions import PermissionDenied

from labs.choices import GroupStatus, ObservedState, OperationStatus, Role
from labs.compute import bulk
from labs.compute.bulk import vms_bulk_request
from labs.errors import Invalid
from labs.models import Group, Operation

pytestmark = pytest.mark.django_db


@pytest.fixture
def echo(other_course, make_student, make_group):
    erin = make_student("erin", in_course=other_course)
    return make_group(course=other_course, by=erin, name="Echo")


def ops():
    """(group, vm, kind) of every Operation, sorted."""
    return sorted(Operation.objects.values_list("vm__group__name", "vm__name", "kind"))


def test_it_queues_one_operation_per_running_vm_of_every_approved_group(
    ines, group_a, group_b, make_vm
):
    make_vm(group_a, name="vm1")
    make_vm(group_a, name="vm2")
    make_vm(group_b, name="vm1")

    result = vms_bulk_request(course=group_a.course, kind="stop", by=ines)

    assert len(result.queued) == 3 and result.skipped == []
    assert ops() == [("Alpha", "vm1", "stop"), ("Alpha", "vm2", "stop"), ("Bravo", "vm1", "stop")]
    assert set(Operation.objects.values_list("status", "requested_by")) == {
        (OperationStatus.QUEUED, ines.pk)
    }
    assert result.summary() == "Queued 3 operations."


def test_vms_that_cannot_take_it_are_skipped_with_their_reason_and_left_untouched(
    ines, group_a, group_b, make_vm
):
    make_vm(group_a, name="vm1")
    make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF)
    make_vm(group_a, name="vm3", host=None, observed_state=ObservedState.NEW)
    busy = make_vm(group_b, name="vm1")
    Operation.objects.create(vm=busy, kind="reboot", status=OperationStatus.RUNNING)

    result = vms_bulk_request(course=group_a.course, kind="stop", by=ines)

    assert [op.vm.name for op in result.queued] == ["vm1"]
    assert [str(skip) for skip in result.skipped] == [
        "Alpha/vm2 is stopped",
        "Alpha/vm3 is not created yet",
        "Bravo/vm1 is busy (reboot in progress)",
    ]
    assert ops() == [("Alpha", "vm1", "stop"), ("Bravo", "vm1", "reboot")]
    assert result.summary() == (
        "Queued 1 operation; skipped 3: Alpha/vm2 is stopped; Alpha/vm3 is not created yet; "
        "Bravo/vm1 is busy (reboot in progress)."
    )


def test_start_reaches_only_stopped_vms(ines, group_a, make_vm):
    make_vm(group_a, name="vm1", observed_state=ObservedState.SHUTOFF)
    make_vm(group_a, name="vm2", observed_state=ObservedState.PAUSED)
    make_vm(group_a, name="vm3")

    result = vms_bulk_request(course=group_a.course, kind="start", by=ines)

    assert ops() == [("Alpha", "vm1", "start")]
    # The same words as a single Start on a running VM ("vm3 is already running.").
    assert [str(s) for s in result.skipped] == [
        "Alpha/vm2 is paused",
        "Alpha/vm3 is already running",
    ]


def test_snapshot_names_itself_and_keeps_the_memory_of_running_vms(ines, group_a, make_vm):
    make_vm(group_a, name="vm1")
    make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF)

    vms_bulk_request(course=group_a.course, kind="snapshot", by=ines)

    params = dict(Operation.objects.values_list("vm__name", "params"))
    assert params["vm1"]["name"].startswith("snap-") and params["vm1"]["with_memory"] is True
    assert params["vm2"]["name"].startswith("snap-") and params["vm2"]["with_memory"] is False


def test_reset_reaches_every_created_vm_running_or_not(ines, group_a, make_vm):
    make_vm(group_a, name="vm1")
    make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF)
    make_vm(group_a, name="vm3", observed_state=ObservedState.MISSING)
    make_vm(group_a, name="vm4", host=None, observed_state=ObservedState.NEW)
    make_vm(group_a, name="vm5", desired_state="deleted", observed_state="deleted")

    result = vms_bulk_request(course=group_a.course, kind="reset", by=ines)

    assert ops() == [
        ("Alpha", "vm1", "reset"),
        ("Alpha", "vm2", "reset"),
        ("Alpha", "vm3", "reset"),
    ]
    assert [str(s) for s in result.skipped] == ["Alpha/vm4 is not created yet"]


def test_only_the_selected_groups_are_touched(ines, group_a, group_b, make_vm):
    make_vm(group_a)
    make_vm(group_b)

    vms_bulk_request(course=group_a.course, kind="reset", by=ines, group_ids=[group_b.pk])

    assert ops() == [("Bravo", "vm1", "reset")]


def test_all_means_the_approved_groups_only(ines, group_a, group_b, make_vm):
    make_vm(group_a)
    make_vm(group_b)
    Group.objects.filter(pk=group_b.pk).update(status=GroupStatus.REJECTED)

    vms_bulk_request(course=group_a.course, kind="stop", by=ines)

    assert ops() == [("Alpha", "vm1", "stop")]


def test_the_groups_of_another_course_are_never_touched(ines, group_a, echo, make_vm):
    make_vm(group_a)
    make_vm(echo)

    vms_bulk_request(course=group_a.course, kind="stop", by=ines)
    assert ops() == [("Alpha", "vm1", "stop")]

    with pytest.raises(Invalid, match="not in this course"):
        vms_bulk_request(
            course=group_a.course, kind="reset", by=ines, group_ids=[group_a.pk, echo.pk]
        )
    assert ops() == [("Alpha", "vm1", "stop")]  # refused as a whole: nothing more


def test_an_empty_selection_is_refused(ines, group_a, make_vm):
    make_vm(group_a)
    with pytest.raises(Invalid, match="at least one group"):
        vms_bulk_request(course=group_a.course, kind="stop", by=ines, group_ids=[])
    assert ops() == []


@pytest.mark.parametrize("kind", ["delete", "force_off", "provision", "revert", "bogus"])
def test_other_kinds_are_refused(ines, group_a, make_vm, kind):
    make_vm(group_a)
    with pytest.raises(Invalid):
        vms_bulk_request(course=group_a.course, kind=kind, by=ines)
    assert ops() == []


def test_a_ta_may_ask(make_student, group_a, make_vm):
    tom = make_student("tom", role=Role.TA)
    make_vm(group_a)
    assert len(vms_bulk_request(course=group_a.course, kind="stop", by=tom).queued) == 1


@pytest.mark.parametrize("who", ["alice", "carol", "olga"])
def test_students_and_staff_of_another_course_may_not(request, who, group_a, group_b, make_vm):
    user = request.getfixturevalue(who)
    make_vm(group_a)
    with pytest.raises(PermissionDenied):
        vms_bulk_request(course=group_a.course, kind="stop", by=user)
    assert ops() == []


def test_a_vm_that_turns_busy_meanwhile_is_skipped_and_the_others_still_go(
    ines, group_a, group_b, make_vm, monkeypatch
):
    """The pre-check saw it idle; the database's one-active-operation rule still holds."""
    make_vm(group_a)
    busy = make_vm(group_b)
    Operation.objects.create(vm=busy, kind="start", status=OperationStatus.QUEUED)
    monkeypatch.setattr(bulk, "_refusal", lambda vm, kind: None)

    result = vms_bulk_request(course=group_a.course, kind="reset", by=ines)

    assert [op.vm.group.name for op in result.queued] == ["Alpha"]
    assert [str(s) for s in result.skipped] == [
        "Bravo/vm1 is busy (start in progress); try again when it has finished"
    ]
    assert ops() == [("Alpha", "vm1", "reset"), ("Bravo", "vm1", "start")]


def test_the_tasks_are_sent_after_commit_one_per_queued_operation(
    ines, group_a, group_b, make_vm, django_capture_on_commit_callbacks, monkeypatch
):
    from labs.compute import dispatch

    sent = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: sent.append(op_id) or "task-1")
    make_vm(group_a)
    make_vm(group_b, observed_state=ObservedState.SHUTOFF)
    with django_capture_on_commit_callbacks(execute=True):
        result = vms_bulk_request(course=group_a.course, kind="stop", by=ines)
        assert sent == []  # not before the transaction commits
    assert sent == [op.pk for op in result.queued] and len(sent) == 1


class AsyncResult:
    id = "task-1"


def test_a_long_list_of_skips_is_summarised(ines, group_a, make_vm):
    for n in range(1, 9):
        make_vm(group_a, name=f"vm{n}", observed_state=ObservedState.SHUTOFF)
    result = vms_bulk_request(course=group_a.course, kind="stop", by=ines)
    assert result.summary() == (
        "Queued nothing; skipped 8: Alpha/vm1 is stopped; Alpha/vm2 is stopped; "
        "Alpha/vm3 is stopped; Alpha/vm4 is stopped; Alpha/vm5 is stopped; and 3 more."
    )


def test_a_ta_of_another_course_may_not(otto, group_a, make_vm):
    make_vm(group_a)
    with pytest.raises(PermissionDenied):
        vms_bulk_request(course=group_a.course, kind="stop", by=otto)
    assert ops() == []
