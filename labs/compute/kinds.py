"""The operation catalogue: every kind of Operation, defined once.

One entry per kind says its label, the VM states it accepts (one rule for a single
request and a bulk one), who may ask for it, whether it destroys data (and so needs a
confirmation), which parameters it takes and the executor that runs it. Forms, the group
page, the overview's bulk form, the request service and the runner all read it; a new
kind is one entry here, one executor and the driver methods it needs.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from django.utils import timezone

from labs.choices import ObservedState, OperationKind
from labs.compute import archives, executors, images, moves, quotas
from labs.compute.shares import shares_refusal
from labs.errors import Busy, Invalid, OverQuota, Refused
from labs.models import Operation, Vm

SNAPSHOT_NAME_MAX = 60


class Audience(StrEnum):
    MEMBERS = "members"  # the group's members (once approved) and the course's staff
    STAFF = "staff"  # the course's staff only
    SYSTEM = "system"  # Stratus itself (approval, reconcile); never requested by a person


class Params(StrEnum):
    NONE = "none"
    NEW_SNAPSHOT = "new_snapshot"  # an optional new name; memory kept when it runs
    SNAPSHOT = "snapshot"  # the name of an existing snapshot


@dataclass(frozen=True)
class Kind:
    kind: str
    executor: Callable[[Operation], None]
    accepts: frozenset[str]  # observed states the VM may be in
    audience: Audience = Audience.MEMBERS
    destroys: bool = False  # erases data: the page and the bulk form ask to confirm
    confirm: str = ""  # the question the page asks before sending it
    params: Params = Params.NONE
    bulk: bool = False  # offered by the overview's bulk form
    button: str = ""  # the button's text when it is not the label
    already: frozenset[str] = field(default_factory=frozenset)  # "is already running"
    # States it accepts without a button on the VM's card (another kind says it better).
    off_card: frozenset[str] = field(default_factory=frozenset)

    @property
    def label(self) -> str:
        return OperationKind(self.kind).label

    @property
    def button_text(self) -> str:
        return self.button or self.label

    @property
    def on_snapshot(self) -> bool:
        """Offered on a snapshot's row (it names an existing snapshot)."""
        return self.params == Params.SNAPSHOT


S = ObservedState
_CREATED = frozenset({S.RUNNING, S.PAUSED, S.SAVED, S.SHUTOFF, S.CRASHED, S.MISSING, S.UNKNOWN})
_ON_DISK = frozenset({S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED})

CATALOGUE: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind(
            OperationKind.START,
            executors.start,
            accepts=frozenset({S.SHUTOFF, S.CRASHED, S.SAVED}),
            already=frozenset({S.RUNNING}),
            bulk=True,
            # A VM suspended to disk is resumed: the card offers Resume alone (Start still
            # restores it, for the bulk form and the course clock).
            off_card=frozenset({S.SAVED}),
        ),
        Kind(OperationKind.SUSPEND, executors.suspend, accepts=frozenset({S.RUNNING}), bulk=True),
        Kind(
            OperationKind.SAVE,
            executors.save,
            accepts=frozenset({S.RUNNING, S.PAUSED}),
            already=frozenset({S.SAVED}),
            bulk=True,
        ),
        Kind(
            OperationKind.RESUME,
            executors.resume,
            accepts=frozenset({S.PAUSED, S.SAVED}),
            already=frozenset({S.RUNNING}),
            bulk=True,
        ),
        Kind(OperationKind.STOP, executors.stop, accepts=frozenset({S.RUNNING}), bulk=True),
        Kind(OperationKind.REBOOT, executors.reboot, accepts=frozenset({S.RUNNING})),
        Kind(
            OperationKind.FORCE_OFF,
            executors.force_off,
            accepts=frozenset({S.RUNNING, S.PAUSED}),
            destroys=True,
            confirm="Force off cuts the power: unsaved work in the VM is lost.",
        ),
        Kind(
            OperationKind.SNAPSHOT,
            executors.snapshot,
            accepts=_ON_DISK,
            params=Params.NEW_SNAPSHOT,
            bulk=True,
        ),
        Kind(
            OperationKind.REVERT,
            executors.revert,
            accepts=_ON_DISK,
            params=Params.SNAPSHOT,
            destroys=True,
            confirm="Revert discards every change made since this snapshot. Continue?",
            button="Revert",
        ),
        Kind(
            OperationKind.SNAPSHOT_DELETE,
            executors.snapshot_delete,
            accepts=_ON_DISK,
            params=Params.SNAPSHOT,
            destroys=True,
            confirm="Delete this snapshot?",
            button="Delete",
        ),
        Kind(
            OperationKind.RESET,
            executors.reset,
            accepts=_CREATED,
            destroys=True,
            confirm="Reset erases the disk and every snapshot of this VM and starts it fresh. "
            "Continue?",
            bulk=True,
        ),
        Kind(
            OperationKind.DELETE,
            executors.delete,
            accepts=_CREATED,
            destroys=True,
            confirm="Delete this VM with its disk and snapshots? This cannot be undone.",
        ),
        Kind(
            # Asked for by Stratus when the group's network changed on another host
            # (labs/compute/networks.py): this VM's host brings its copy up to date.
            OperationKind.NETWORK_SYNC,
            executors.network_sync,
            accepts=_CREATED,
            audience=Audience.SYSTEM,
        ),
        Kind(
            # Asked for by labs/compute/firewall.py when a rule of the group's firewall
            # was added or removed: this VM's host redefines the group's filter.
            OperationKind.FIREWALL_SYNC,
            executors.firewall_sync,
            accepts=_CREATED,
            audience=Audience.SYSTEM,
        ),
        Kind(
            OperationKind.SSH_SYNC,
            executors.ssh_sync,
            accepts=frozenset({S.RUNNING}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            # Asked for through labs.compute.moves (operators, the course's instructors),
            # never on a group's page.
            OperationKind.MOVE,
            moves.move,
            accepts=frozenset({S.SHUTOFF, S.RUNNING}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            # The end of term (labs/compute/term.py): shut down, export the disk, delete.
            OperationKind.ARCHIVE,
            archives.vm_archive,
            accepts=frozenset({S.RUNNING, S.PAUSED, S.SAVED, S.SHUTOFF, S.CRASHED}),
            audience=Audience.SYSTEM,
            destroys=True,
        ),
        # Block volumes (labs/compute/volumes.py asks for them, with the volume in the
        # parameters; the VM card's volume forms post there, not to the generic endpoint).
        # A volume is attached to a running VM (hot-plugged) or a stopped one; never to
        # one suspended to disk, whose saved devices must stay as they are.
        Kind(
            OperationKind.VOLUME_CREATE,
            executors.volume_create,
            accepts=frozenset({S.RUNNING, S.SHUTOFF}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            OperationKind.VOLUME_ATTACH,
            executors.volume_attach,
            accepts=frozenset({S.RUNNING, S.SHUTOFF}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            OperationKind.VOLUME_DETACH,
            executors.volume_detach,
            accepts=frozenset({S.RUNNING, S.SHUTOFF, S.CRASHED}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            # Recorded on a VM of the group on the volume's host (its worker deletes it).
            OperationKind.VOLUME_DELETE,
            executors.volume_delete,
            accepts=_CREATED | {S.DELETED},
            audience=Audience.SYSTEM,
            destroys=True,
            confirm="Delete this volume and everything on it? This cannot be undone.",
        ),
        # Published ports (labs/compute/ports.py asks for them, with the publication in the
        # parameters; the VM card's port forms post there). A running VM gets the forward
        # at once, a stopped one at its next start; never one suspended to disk, whose
        # saved QEMU would come back with the forwards of its saving.
        Kind(
            OperationKind.PORT_PUBLISH,
            executors.port_publish,
            accepts=frozenset({S.RUNNING, S.SHUTOFF}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            OperationKind.PORT_UNPUBLISH,
            executors.port_unpublish,
            accepts=frozenset({S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            # A course image from the VM's disk (labs/compute/images.py): asked for by the
            # course's instructors in the admin or manage.py capture_vm, never on a group's
            # page. A running VM's file systems are frozen while its disk is read.
            OperationKind.CAPTURE,
            images.vm_capture,
            accepts=frozenset({S.RUNNING, S.SHUTOFF}),
            audience=Audience.SYSTEM,
        ),
        Kind(
            OperationKind.PROVISION,
            executors.provision,
            accepts=frozenset({S.NEW}),
            audience=Audience.SYSTEM,
        ),
    )
}
assert set(CATALOGUE) == set(OperationKind.values), "every OperationKind needs an entry"


def kind_of(kind: str) -> Kind | None:
    return CATALOGUE.get(kind)


def requestable(kind: str) -> Kind | None:
    """The entry for a kind a person may ask for; None for unknown and system kinds."""
    entry = CATALOGUE.get(kind)
    return entry if entry is not None and entry.audience != Audience.SYSTEM else None


def bulk_kinds() -> list[Kind]:
    return [k for k in CATALOGUE.values() if k.bulk]


def on_vm_card(vm: Vm) -> list[Kind]:
    """The buttons of a VM on its group page, in catalogue order: kinds that take no
    snapshot name and accept the VM's state."""
    return [
        k
        for k in CATALOGUE.values()
        if k.audience != Audience.SYSTEM
        and k.params == Params.NONE
        and vm.observed_state in k.accepts
        and vm.observed_state not in k.off_card
    ]


def on_snapshot_row(vm: Vm) -> list[Kind]:
    return [k for k in CATALOGUE.values() if k.on_snapshot and vm.observed_state in k.accepts]


def takes_snapshots(vm: Vm) -> bool:
    return vm.observed_state in CATALOGUE[OperationKind.SNAPSHOT].accepts


# --- the verdict ---------------------------------------------------------------------------


def refusal(kind: Kind, vm: Vm, *, active: Operation | None) -> Refused | None:
    """Why ``vm`` cannot take ``kind`` now, or None: the one rule for single and bulk.

    ``active`` is the VM's queued or running operation, if any (the caller has it loaded;
    the database's one-active-operation constraint still decides a race).
    """
    if vm.desired_state == "deleted":
        return Refused(f"{vm.name} is deleted.")
    if active is not None:
        return Busy(f"{vm.name} is busy ({active.get_kind_display().lower()} in progress).")
    if vm.host_id is None or vm.observed_state == S.NEW:
        return Refused(f"{vm.name} is not created yet.")
    state = vm.observed_state
    if state not in kind.accepts:
        already = "already " if state in kind.already else ""
        return Refused(f"{vm.name} is {already}{S(state).label.lower()}.")
    return shares_refusal(kind.kind, vm, state)


def params_clean(kind: Kind, vm: Vm, params: dict | None) -> dict:
    """The kind's own parameters, checked; Invalid or Refused when they are unusable.

    Only snapshot kinds take a name; every other kind takes nothing (an empty value from
    a form's hidden field is ignored, anything else refused).
    """
    params = {k: v for k, v in (params or {}).items() if v not in ("", None)}
    if kind.params == Params.NONE:
        if params:
            raise Invalid(f"{kind.label} takes no parameters.")
        return {}
    name = str(params.pop("name", "")).strip()
    if params:
        raise Invalid(f"{kind.label} takes only a snapshot name.")
    if kind.params == Params.SNAPSHOT:
        if not vm.snapshots.filter(name=name).exists():
            raise Refused(f"{vm.name} has no snapshot named “{name[:SNAPSHOT_NAME_MAX]}”.")
        return {"name": name}
    name = name or timezone.now().strftime("snap-%Y%m%d-%H%M%S")
    if len(name) > SNAPSHOT_NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
        raise Invalid(
            "A snapshot name uses letters, digits, '-', '_' and '.', up to 60 characters."
        )
    if vm.snapshots.filter(name=name).exists():
        raise Refused(f"{vm.name} already has a snapshot named “{name}”.")
    limit = vm.group.course.snapshot_limit
    if (count := vm.snapshots.count()) >= limit:
        raise OverQuota(
            f"{vm.name} has {count} snapshots, the most this course allows: delete one first."
        )
    # A running (or paused) VM is snapshotted with its memory and comes back as it was; a
    # stopped VM gets a disk-only snapshot. The memory counts against the disk quota.
    with_memory = vm.observed_state in (S.RUNNING, S.PAUSED)
    if with_memory:
        quotas.quota_check(group=vm.group, need={"disk_gib": quotas.snapshot_memory_gib(vm)})
    return {"name": name, "with_memory": with_memory}
