"""Block volumes: a group's data disks, asked for by its members.

A volume is made for a VM and lives on that VM's host, a standalone qcow2 beside its
overlay; it is attached to one VM at a time (hot-plugged into a running one), detached,
attached again to any VM of the group on the same host, and deleted once detached. Its
size counts against the group's disk quota, as the VMs' own disks do.

Each change is an Operation of the catalogue (labs/compute/kinds.py: ``volume_create``,
``volume_attach``, ``volume_detach``, ``volume_delete``), on the VM it concerns, with the
volume in its parameters: the row is the audit trail and the VM's host's worker runs it
(labs/compute/executors.py). Deleting a detached volume is recorded on a VM of the group
on the volume's host: that host's worker removes the file.

What a volume survives: a reset of its VM (only the system overlay is made again; the
domain is defined with the volume attached), the VM's deletion (it stays, detached), a
cold move (copied beside the overlay, the same serial). A live move of a VM with volumes
is refused (labs/compute/moves.py): shut it down and it moves with them.
"""

import re

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from labs import access
from labs.access import Action
from labs.choices import ACTIVE_OPERATION_STATUSES, OperationKind, VolumeState
from labs.compute import dispatch, kinds, quotas, requests, term
from labs.drivers.base import MAX_VOLUMES
from labs.errors import Busy, Invalid, NotAllowed, Refused
from labs.models import Group, Operation, Snapshot, Vm, Volume
from labs.models.volumes import VOLUME_NAME_MAX, VOLUME_NAME_PATTERN

SIZE_MAX_GIB = 2048


# --- reads ---------------------------------------------------------------------------------


def volume_for_user(*, user: AbstractBaseUser, volume_id: int) -> Volume:
    """A volume the user may view (its group's member, course staff); else 404."""
    from django.http import Http404

    volume = (
        access.restrict(Volume.objects.all(), user=user, action=Action.VIEW)
        .select_related("group__course", "host", "vm")
        .filter(pk=volume_id)
        .first()
    )
    if volume is None:
        raise Http404("No such volume.")
    return volume


def volumes_of_group(*, group: Group) -> list[Volume]:
    """The group's volumes with their host and VM, by name (one query)."""
    return list(Volume.objects.filter(group=group).select_related("host", "vm").order_by("name"))


def volume_busy(volume: Volume) -> Operation | None:
    """The queued or running operation on this volume, if any."""
    return (
        Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES, params__volume=volume.pk)
        .select_related("vm")
        .first()
    )


def snapshots_holding(volume: Volume) -> list[Snapshot]:
    """The snapshots of the group's VMs that hold this volume's contents."""
    return [
        snap
        for snap in Snapshot.objects.filter(vm__group=volume.group_id).select_related("vm")
        if any(v.get("serial") == volume.serial for v in snap.volumes)
    ]


# --- the checks every request makes ---------------------------------------------------------


def _checked(*, kind: str, vm: Vm, by: AbstractBaseUser | None, states: bool = True) -> None:
    """Who may ask, the deadline, the group's rate, and the VM's state: the same rules as
    every other operation on the VM (labs/compute/requests.py)."""
    entry = kinds.CATALOGUE[kind]
    requests.requester_check(kind=entry, vm=vm, by=by)
    if (locked := term.request_refusal(kind=kind, vm=vm, by=by)) is not None:
        raise locked
    requests.rate_check(vm=vm, by=by)
    if states and (refused := kinds.refusal(entry, vm, active=None)) is not None:
        raise refused


def _not_busy(volume: Volume) -> None:
    active = volume_busy(volume)
    if active is not None:
        raise Busy(
            f"Volume {volume.name} is busy ({active.get_kind_display().lower()} on "
            f"{active.vm.name}); try again when it has finished."
        )


def _room_on(vm: Vm) -> None:
    if Volume.objects.filter(vm=vm).count() >= MAX_VOLUMES:
        raise Refused(f"{vm.name} has {MAX_VOLUMES} volumes, the most a VM takes.")


def _send(*, vm: Vm, kind: str, volume: Volume, by: AbstractBaseUser | None) -> Operation:
    # "name" is what the operation history shows beside the kind ("Add volume “data”").
    params = {"volume": volume.pk, "name": volume.name}
    return dispatch.operation_create(vm=vm, kind=kind, by=by, params=params)


def name_clean(name: str) -> str:
    name = (name or "").strip().lower()
    if not name or len(name) > VOLUME_NAME_MAX or not re.fullmatch(VOLUME_NAME_PATTERN, name):
        raise Invalid(
            f"A volume name uses a-z, 0-9 and '-' (not first), up to {VOLUME_NAME_MAX} characters."
        )
    return name


# --- the requests ----------------------------------------------------------------------------


def volume_create_request(
    *, vm: Vm, name: str, size_gib: int, by: AbstractBaseUser | None
) -> Operation:
    """A new empty volume of ``size_gib`` on ``vm``'s host, attached to ``vm`` (hot-plugged
    when it runs), within the group's disk quota."""
    name = name_clean(name)
    if not isinstance(size_gib, int) or not 1 <= size_gib <= SIZE_MAX_GIB:
        raise Invalid(f"A volume is 1 to {SIZE_MAX_GIB} GiB.")
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    _checked(kind=OperationKind.VOLUME_CREATE, vm=vm, by=by)
    with transaction.atomic():
        group = Group.objects.select_for_update().get(pk=vm.group_id)
        if Volume.objects.filter(group=group, name=name).exists():
            raise Refused(f"Your group already has a volume named “{name}”.")
        _room_on(vm)
        quotas.quota_check(group=group, need={"disk_gib": size_gib})
        volume = Volume.objects.create(
            group=group, name=name, size_gib=size_gib, host=vm.host, created_by=by
        )
        return _send(vm=vm, kind=OperationKind.VOLUME_CREATE, volume=volume, by=by)


def volume_attach_request(*, volume: Volume, vm: Vm, by: AbstractBaseUser | None) -> Operation:
    """Attach a detached volume of the group to ``vm`` (running: hot-plugged; stopped: at
    its next start). Both must be on the same host: a volume moves only with its VM."""
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    volume = Volume.objects.select_related("host", "vm", "group").get(pk=volume.pk)
    if volume.group_id != vm.group_id:
        raise NotAllowed("A volume is attached only to a VM of its own group.")
    _checked(kind=OperationKind.VOLUME_ATTACH, vm=vm, by=by)
    if volume.vm_id is not None:
        raise Refused(f"Volume {volume.name} is attached to {volume.vm.name}: detach it first.")
    if volume.state != VolumeState.READY:
        raise Refused(f"Volume {volume.name} is {volume.get_state_display().lower()}.")
    if volume.host_id != vm.host_id:
        raise Refused(
            f"Volume {volume.name} is on host {volume.host.name} and {vm.name} on "
            f"{vm.host.name}: a volume is attached on its own host only."
        )
    _not_busy(volume)
    _room_on(vm)
    return _send(vm=vm, kind=OperationKind.VOLUME_ATTACH, volume=volume, by=by)


def volume_detach_request(*, volume: Volume, by: AbstractBaseUser | None) -> Operation:
    """Take the volume off its VM (a running guest is asked to let it go): it stays on
    the host, with everything on it."""
    volume = Volume.objects.select_related("host", "vm__group__course", "vm__host").get(
        pk=volume.pk
    )
    if volume.vm is None:
        raise Refused(f"Volume {volume.name} is not attached.")
    _checked(kind=OperationKind.VOLUME_DETACH, vm=volume.vm, by=by)
    _not_busy(volume)
    return _send(vm=volume.vm, kind=OperationKind.VOLUME_DETACH, volume=volume, by=by)


def volume_delete_request(*, volume: Volume, by: AbstractBaseUser | None) -> Operation:
    """Delete a detached volume and everything on it; refused while a snapshot holds it
    (the snapshot could not be reverted any more)."""
    volume = Volume.objects.select_related("host", "vm", "group__course").get(pk=volume.pk)
    if volume.vm_id is not None:
        raise Refused(f"Volume {volume.name} is attached to {volume.vm.name}: detach it first.")
    holding = snapshots_holding(volume)
    if holding:
        snap = holding[0]
        raise Refused(
            f"Volume {volume.name} is in snapshot {snap.name} of {snap.vm.name}: delete that "
            "snapshot first."
        )
    carrier = _carrier(volume)
    if carrier is None:
        raise Refused(
            f"No VM of your group is on host {volume.host.name} any more, where volume "
            f"{volume.name} is: ask your instructor to delete it."
        )
    _checked(kind=OperationKind.VOLUME_DELETE, vm=carrier, by=by, states=False)
    _not_busy(volume)
    return _send(vm=carrier, kind=OperationKind.VOLUME_DELETE, volume=volume, by=by)


def _carrier(volume: Volume) -> Vm | None:
    """The VM a detached volume's deletion is recorded on: one of its group on its host,
    a live one first (a deleted VM's row stays, and names the host as well)."""
    on_host = Vm.objects.filter(group=volume.group_id, host=volume.host_id).select_related(
        "host", "group__course"
    )
    return on_host.live().order_by("name").first() or on_host.order_by("-pk").first()


def quota_left_gib(*, group: Group) -> int:
    """The disk (GiB) the group may still give a new volume."""
    quota, used = quotas.group_quota(group=group), quotas.group_usage(group=group)
    return max(quota["disk_gib"] - used["disk_gib"], 0)
