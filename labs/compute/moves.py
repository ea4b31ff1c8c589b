"""Moving a VM to another host: who may ask, where it may go, and the executor.

This is the cold move (a stopped VM, with its disk, seed and every snapshot); the live one
comes behind the same request. Operators ask for it (``manage.py move_vm``, the admin),
never students: a move changes the VM's SSH line and takes it off its host for a while.

The executor is safe to run again at any point (a worker killed midway, a host that did
not answer): the destination is recorded in the Operation's parameters with the SSH port
taken there, the destination's copy is made whole first (or removed), then the VM's row
names the destination, and only then is the source's copy removed. A retry that finds
the row already moved only removes what is left on the source.
"""

import logging
from dataclasses import replace

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from labs import access
from labs.access import Action
from labs.choices import ACTIVE_OPERATION_STATUSES, HostState, ObservedState, OperationKind
from labs.compute import dispatch, placement, ssh_access
from labs.compute.records import NO_CONSOLE, operation_progress, vm_observe
from labs.drivers.registry import driver_for
from labs.errors import Invalid, NotAllowed, Refused
from labs.live import events
from labs.models import Host, Operation, Vm

log = logging.getLogger(__name__)


def vm_move_request(*, vm: Vm, to: Host, by: AbstractBaseUser | None) -> Operation:
    """Ask for a cold move of ``vm`` to host ``to``; refused with the reason when the VM
    is not stopped, ``to`` is its own host, not up, or has no room or SSH port for it."""
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    if by is not None and not access.may(by, Action.MOVE, vm):
        raise NotAllowed("Only the course's instructors and operators move VMs between hosts.")
    if vm.host_id is None or vm.observed_state == ObservedState.NEW:
        raise Refused(f"{vm.name} is not created yet.")
    if vm.host_id == to.pk:
        raise Invalid(f"{vm.name} is on {to.name} already.")
    if vm.observed_state != ObservedState.SHUTOFF:
        raise Refused(
            f"{vm.name} is {ObservedState(vm.observed_state).label.lower()}: shut it down "
            "first (a cold move takes a stopped VM)."
        )
    with transaction.atomic():
        host = Host.objects.select_for_update().get(pk=to.pk)
        if host.state != HostState.UP:
            raise Refused(f"Host {host.name} is {host.state_label}: it takes no VMs.")
        if not placement.host_usage(host=host).fits(vm):
            raise Refused(f"Host {host.name} has no room for {vm.name}.")
        port = _free_port(host)
        if port is None:
            raise Refused(f"Host {host.name} has no free SSH port.")
        params = {"host": host.pk, "from": vm.host_id, "ssh_port": port}
        return dispatch.operation_create(vm=vm, kind=OperationKind.MOVE, by=by, params=params)


def _free_port(host: Host) -> int | None:
    """A port of ``host`` that no VM there holds and no move to it has taken."""
    taken = set(
        Vm.objects.filter(host=host, ssh_port__isnull=False).values_list("ssh_port", flat=True)
    )
    for op in Operation.objects.filter(
        kind=OperationKind.MOVE, status__in=ACTIVE_OPERATION_STATUSES
    ).only("params"):
        if op.params.get("host") == host.pk:
            taken.add(op.params.get("ssh_port"))
    return next(
        (p for p in range(host.ssh_port_min, host.ssh_port_max + 1) if p not in taken), None
    )


def move(op: Operation) -> None:
    from labs.compute.executors import vm_seed, vm_spec

    vm = Vm.objects.select_related("host", "group__course", "image").get(pk=op.vm_id)
    source_host = Host.objects.get(pk=op.params["from"])
    target_host = Host.objects.get(pk=op.params["host"])
    port = int(op.params["ssh_port"])
    report = operation_progress(op)
    src, dst = driver_for(source_host), driver_for(target_host)
    on_source = vm.host_id == source_host.pk
    vm.host = source_host
    source = vm_spec(vm)  # after a retry past the switch: only its name, uuid and storage
    if on_source:
        vm.host = target_host
        target = replace(
            vm_spec(vm),
            ssh_port=port,
            virt_type=dst.resolve_virt_type(target_host.virt_type),
        )
        seed = vm_seed(vm, ssh_access.access_wanted(vm))
        timings = src.copy_offline(
            dst, source=source, target=target, seed_iso=seed, progress=report
        )
        op.params = {**op.params, "timings": {k: round(v, 2) for k, v in timings.items()}}
        Operation.objects.filter(pk=op.pk).update(params=op.params)
        # The destination holds the whole VM: from now on the VM is there.
        Vm.objects.filter(pk=vm.pk).update(host=target_host, ssh_port=port, **NO_CONSOLE)
        log.info("%s moved from %s to %s", vm.domain_name, source_host.name, target_host.name)
    report(f"removing the old copy from {source_host.name}")
    src.delete(source)
    vm.refresh_from_db()
    vm_observe(vm, ObservedState.SHUTOFF, f"Moved from {source_host.name} to {target_host.name}.")
    events.vm_changed(vm=vm)
