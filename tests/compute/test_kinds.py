"""The operation catalogue: one verdict for a single request and a bulk one, for every kind
in every VM state; and the catalogue is what the page, the form and the runner read."""

import pytest

from labs.choices import ObservedState, OperationKind
from labs.compute import kinds
from labs.compute.bulk import vms_bulk_request
from labs.compute.requests import vm_operation_request
from labs.errors import Invalid, StratusError
from labs.models import Operation, Snapshot

pytestmark = pytest.mark.django_db

REQUESTABLE = [k for k in OperationKind.values if kinds.requestable(k) is not None]


def single_verdict(vm, kind, by) -> str:
    """ "queued", or the refusal's message."""
    try:
        vm_operation_request(vm=vm, kind=kind, by=by, params=_params(kind))
    except StratusError as error:
        return error.message.rstrip(".")
    return "queued"


def bulk_verdict(vm, kind, by) -> str:
    result = vms_bulk_request(course=vm.group.course, kind=kind, by=by, params=_params(kind))
    if result.queued:
        return "queued"
    [skip] = result.skipped
    return skip.reason.rstrip(".")


def _params(kind):
    return {"name": "s1"} if kinds.CATALOGUE[kind].params == kinds.Params.SNAPSHOT else None


@pytest.mark.parametrize("state", ObservedState.values)
@pytest.mark.parametrize("kind", REQUESTABLE)
def test_a_single_and_a_bulk_request_get_the_same_verdict(
    kind, state, ines, group_a, make_vm, django_capture_on_commit_callbacks, monkeypatch
):
    from labs.compute import dispatch

    monkeypatch.setattr(dispatch, "task_send", lambda op_id: "")
    fields = {"observed_state": state}
    if state == ObservedState.NEW:
        fields["host"] = None
    if state == ObservedState.DELETED:
        fields["desired_state"] = "deleted"
    vm = make_vm(group_a, **fields)
    Snapshot.objects.create(vm=vm, name="s1", with_memory=False)

    single = single_verdict(vm, kind, ines)
    Operation.objects.all().delete()
    entry = kinds.CATALOGUE[kind]
    if not entry.bulk:
        # Kinds the overview does not offer in bulk (delete, revert, ...) are refused whole.
        with pytest.raises(Invalid):
            vms_bulk_request(course=vm.group.course, kind=kind, by=ines)
        return
    if state == ObservedState.DELETED:
        # A deleted VM is not among the course's VMs a bulk request looks at at all.
        assert single == "vm1 is deleted"
        assert vms_bulk_request(course=vm.group.course, kind=kind, by=ines).summary() == (
            "The selected groups have no VMs."
        )
        return
    assert bulk_verdict(vm, kind, ines) == single
    # ... and the catalogue says the same thing up front.
    expected = "queued" if state in entry.accepts else single
    assert single == expected


def test_every_kind_has_one_entry_with_an_executor():
    assert set(kinds.CATALOGUE) == set(OperationKind.values)
    for entry in kinds.CATALOGUE.values():
        assert callable(entry.executor), entry.kind
        assert entry.accepts <= set(ObservedState.values), entry.kind


def test_paused_vms_offer_resume_not_start_and_running_ones_suspend(make_vm, group_a):
    running = make_vm(group_a, name="vm1")
    paused = make_vm(group_a, name="vm2", observed_state=ObservedState.PAUSED)
    saved = make_vm(group_a, name="vm3", observed_state=ObservedState.SAVED)
    assert [k.kind for k in kinds.on_vm_card(running)] == [
        "suspend",
        "save",
        "stop",
        "reboot",
        "force_off",
        "reset",
        "delete",
    ]
    assert [k.kind for k in kinds.on_vm_card(paused)] == [
        "save",
        "resume",
        "force_off",
        "reset",
        "delete",
    ]
    # Suspended to disk: Resume restores it (Start would too, but the card offers one
    # button for it); nothing else runs on a saved VM.
    assert [k.kind for k in kinds.on_vm_card(saved)] == ["resume", "reset", "delete"]


@pytest.mark.parametrize(
    "kind", [k for k in REQUESTABLE if kinds.CATALOGUE[k].params == kinds.Params.NONE]
)
def test_kinds_without_parameters_refuse_a_name(kind, ines, group_a, make_vm):
    vm = make_vm(group_a, observed_state=sorted(kinds.CATALOGUE[kind].accepts)[0])
    with pytest.raises(Invalid, match="takes no parameters"):
        vm_operation_request(vm=vm, kind=kind, by=ines, params={"name": "x" * 2_000_000})
    assert not Operation.objects.exists()
