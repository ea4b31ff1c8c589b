"""Moving a VM to another host: who may ask, where it may go, and the executor.

A stopped VM moves cold, with its disk, seed and every snapshot; a running one moves live
(its memory and disk copied while it runs, a short pause at the end; a VM with snapshots
cannot, libvirt keeps them inside the disk and refuses). Operators and the course's
instructors ask for it (``manage.py move_vm``), never students: a move changes the VM's
SSH line and takes it off its host for a while.

The executor is safe to run again at any point (a worker killed midway, a host that did
not answer): the destination is recorded in the Operation's parameters with the SSH port
(and one for each published port) taken there, the destination's copy is made whole
first (or removed), then the VM's row names the destination, and only then is the
source's copy removed. A retry that finds the row already moved only removes what is
left on the source.
"""

import logging
from dataclasses import replace

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from labs import access
from labs.access import Action
from labs.choices import HostState, ObservedState, OperationKind, PortState
from labs.compute import dispatch, networks, placement, ssh_access
from labs.compute.records import (
    NO_CONSOLE,
    operation_progress,
    vm_console_record,
    vm_observe,
)
from labs.drivers.base import DomainMissing, PortSpec
from labs.drivers.registry import driver_for
from labs.errors import Invalid, NotAllowed, Refused
from labs.live import events
from labs.models import Host, Operation, Publication, Vm, Volume

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
    if vm.observed_state not in (ObservedState.SHUTOFF, ObservedState.RUNNING):
        raise Refused(
            f"{vm.name} is {ObservedState(vm.observed_state).label.lower()}: only a running "
            "VM (moved live) or a stopped one (moved with its snapshots) can move."
        )
    live = vm.observed_state == ObservedState.RUNNING
    if live and vm.snapshots.exists():
        raise Refused(
            f"{vm.name} has snapshots, which a live move cannot take along: shut it down "
            "and move it stopped (every snapshot comes along), or delete them first."
        )
    if live and vm.shares:
        raise Refused(
            f"{vm.name} has shared folders (virtiofs), which QEMU cannot migrate: shut it down "
            "and move it stopped (the shares are the same directories on every host)."
        )
    if live and vm.volumes.exists():
        raise Refused(
            f"{vm.name} has block volumes, which a live move does not take along: shut it "
            "down and move it stopped (its volumes come along, the same serials)."
        )
    if vm.group_ip and networks.enabled_on(vm.host) and not networks.enabled_on(to):
        raise Refused(
            f"Host {to.name} has no group networks: {vm.name} would lose its NIC on the "
            f"group's network there. Move it to a host with group networks."
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
        params = {"host": host.pk, "from": vm.host_id, "ssh_port": port, "live": live}
        # Its published ports get ports of the destination's range (publication -> port).
        published = list(Publication.objects.filter(vm=vm).order_by("pk"))
        if published:
            free = placement.published_ports_free(host, count=len(published))
            if len(free) < len(published):
                raise Refused(
                    f"Host {host.name} has no free ports for {vm.name}'s published ports."
                )
            params["ports"] = {str(p.pk): free[i] for i, p in enumerate(published)}
        return dispatch.operation_create(vm=vm, kind=OperationKind.MOVE, by=by, params=params)


def _free_port(host: Host) -> int | None:
    """A port of ``host`` that no VM there holds and no move to it has taken."""
    return placement._free_ssh_port(host, placement._ports_taken([host])[host.pk])


def move(op: Operation) -> None:
    from labs.compute.executors import vm_seed, vm_spec

    vm = Vm.objects.select_related("host", "group__course", "image").get(pk=op.vm_id)
    source_host = Host.objects.get(pk=op.params["from"])
    target_host = Host.objects.get(pk=op.params["host"])
    live = bool(op.params.get("live"))
    report = operation_progress(op)
    src, dst = driver_for(source_host), driver_for(target_host)
    on_source = vm.host_id == source_host.pk
    vm.host = source_host
    source = vm_spec(vm)  # after a retry past the switch: only its name, uuid and storage
    if on_source:
        vm.host = target_host
        moved_ports = {int(k): int(v) for k, v in (op.params.get("ports") or {}).items()}
        target = replace(
            vm_spec(vm),
            ssh_port=int(op.params["ssh_port"]),
            virt_type=dst.resolve_virt_type(target_host.virt_type),
            ports=_ports_there(vm, moved_ports),
        )
        if live and _arrived(src, dst, source, target):
            log.info("%s already runs on %s: finishing its move", vm.domain_name, target_host)
        else:
            if target.group_nic is not None:  # the NIC's network is there before the domain
                report(f"preparing the group network on {target_host.name}")
                dst.network_ensure(networks.network_spec(group=vm.group, host=target_host))
            seed = vm_seed(vm, ssh_access.access_wanted(vm))
            # Open consoles stay on the source while it runs; at the switch its QEMU ends
            # and they connect again to the destination (rules.moved_to, CloseCode.MOVED).
            copy = src.move_live if live else src.copy_offline
            timings = copy(dst, source=source, target=target, seed_iso=seed, progress=report)
            op.params = {**op.params, "timings": {k: round(v, 2) for k, v in timings.items()}}
            Operation.objects.filter(pk=op.pk).update(params=op.params)
        # The destination holds the whole VM: from now on the VM is there.
        Vm.objects.filter(pk=vm.pk).update(
            host=target_host, ssh_port=target.ssh_port, **NO_CONSOLE
        )
        Volume.objects.filter(vm=vm).update(host=target_host)  # copied beside the overlay
        for publication_id, port in moved_ports.items():  # forwarded there from the start
            Publication.objects.filter(pk=publication_id, vm=vm).update(
                host=target_host, host_port=port
            )
        log.info("%s moved from %s to %s", vm.domain_name, source_host.name, target_host.name)
        if live:  # at once: the consoles that followed the move are knocking already
            vm_console_record(vm, dst)
        events.vm_changed(vm=vm)  # the group's page shows the new SSH line
    report(f"removing the old copy from {source_host.name}")
    src.delete(source)
    for volume in source.volumes:
        src.volume_delete(storage_dir=source.storage_dir, volume=volume)
    vm = Vm.objects.select_related("host", "group").get(pk=vm.pk)
    if vm.group_ip:
        _group_network_moved(vm, source_host, src, dst)
    moved = f"Moved from {source_host.name} to {target_host.name}."
    if live:
        if not vm.vnc_socket and not vm.vnc_port:  # a retry past the switch
            vm_console_record(vm, dst)
        vm_observe(vm, ObservedState.RUNNING, moved)
    else:
        vm_observe(vm, ObservedState.SHUTOFF, moved)
    events.vm_changed(vm=vm)


def _group_network_moved(vm: Vm, source_host: Host, src, dst) -> None:
    """The group's network after the VM left ``source_host``: gone there when it was the
    group's last VM on it (else that host's tunnel lists the destination), the
    destination's tunnel without the source when nothing of the group is left there, the
    group's other hosts told. Safe to run again (a retry past the switch)."""
    if networks.enabled_on(source_host):
        spec = networks.network_spec(group=vm.group, host=source_host)
        if any(v.host_id == source_host.pk for v in networks.group_vms(vm.group)):
            src.network_ensure(spec)
        else:
            src.network_remove(spec)
    if networks.enabled_on(vm.host):
        dst.network_ensure(networks.network_spec(group=vm.group, host=vm.host))
    networks.peers_sync(vm=vm)


def _ports_there(vm: Vm, moved: dict[int, int]) -> tuple[PortSpec, ...]:
    """The VM's published ports as the destination forwards them: each on the port the
    move's request took there (one published since has none: it is refused, as any
    operation is while the move runs, so there is none)."""
    rows = Publication.objects.filter(vm=vm).exclude(state=PortState.CLOSING)
    return tuple(
        PortSpec(host_port=moved[p.pk], guest_port=p.guest_port)
        for p in rows.order_by("pk")
        if p.pk in moved
    )


def _arrived(src, dst, source, target) -> bool:
    """A live move that finished on the hosts before its worker could record it: the
    domain is defined on the destination and gone from the source."""
    try:
        dst.state(target.name)
    except DomainMissing:
        return False
    try:
        src.state(source.name)
    except DomainMissing:
        return True
    return False
