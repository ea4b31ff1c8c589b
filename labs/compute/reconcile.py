"""Reconcile: bring what the hosts hold (observed) and what the database wants (desired)
together, every minute from beat.

The database is the truth for what *should* exist, the host for what *does*. Reconcile
never deletes or re-creates a record because a host did not answer: it marks that host's
VMs ``unknown`` and tries again next time.
"""

import logging
from dataclasses import dataclass

from django.db.models import Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    DesiredState,
    ObservedState,
    OperationKind,
    OperationStatus,
)
from labs.compute import dispatch, placement
from labs.compute.records import (
    observed_of,
    state_history,
    vm_console_record,
    vm_consoles_close,
    vm_observe,
)
from labs.drivers.base import HypervisorError
from labs.drivers.registry import driver_for
from labs.live import events, pagecache
from labs.models import Host, Operation, Vm

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    host: str
    reachable: bool
    observed: int = 0
    drift: list[str] | None = None
    restarted: int = 0


def host_reconcile(*, host: Host) -> ReconcileReport:
    """Compare desired and observed state on one host; restart what should be running.

    A host that does not answer marks its VMs ``unknown`` and is ``unreachable`` (no new
    VMs) from the first pass it failed until one it answers: no record is ever deleted or
    re-created because a host was unreachable. One loop on purpose: each VM's state,
    console endpoint, consoles and restart are decided together from one observation.
    """
    report = ReconcileReport(host=host.name, reachable=True, drift=[])
    vms = list(
        Vm.objects.live()
        .filter(host=host)
        .exclude(observed_state=ObservedState.NEW)
        .select_related("group")
    )
    try:
        driver = driver_for(host)
        domains = driver.states()
    except HypervisorError as error:
        report.reachable = False
        now = timezone.now()
        # Since the first pass it failed: a host that stays down keeps its first time.
        Host.objects.filter(pk=host.pk).update(
            last_error=str(error)[:2000],
            unreachable_since=Coalesce("unreachable_since", Value(now)),
        )
        Vm.objects.filter(pk__in=[v.pk for v in vms]).update(
            observed_state=ObservedState.UNKNOWN, observed_at=now
        )
        for vm in vms:
            if vm.observed_state != ObservedState.UNKNOWN:
                state_history(vm, ObservedState.UNKNOWN, now)
                events.vm_changed(vm=vm)
        if host.unreachable_since is None:  # the pages' Hosts say so from now on
            pagecache.bump("all")
        log.warning("reconcile: host %s did not answer: %s", host.name, error)
        return report
    Host.objects.filter(pk=host.pk).update(
        last_seen_at=timezone.now(), last_error="", unreachable_since=None
    )
    if host.unreachable_since is not None or host.last_error:
        pagecache.bump("all")  # back
    busy = set(
        Operation.objects.filter(vm__in=vms, status__in=ACTIVE_OPERATION_STATUSES).values_list(
            "vm_id", flat=True
        )
    )
    for vm in vms:
        if vm.pk in busy:
            continue  # its operation will set the state
        domain = domains.get(str(vm.uuid))
        state = observed_of(domain.state if domain else None)
        report.observed += 1
        if state != vm.observed_state:
            report.drift.append(f"{vm}: {vm.observed_state} → {state}")
            log.info("reconcile: %s observed %s (was %s)", vm, state, vm.observed_state)
        message = None
        if state == ObservedState.MISSING:
            message = "The VM is missing on its host; an instructor can reset it."
        if state != ObservedState.RUNNING and vm.observed_state == ObservedState.RUNNING:
            vm_consoles_close(vm, f"the VM is {state}")
        if state == ObservedState.RUNNING and (
            vm.observed_state != ObservedState.RUNNING or not vm.vnc_name
        ):
            # Started outside an operation (or recorded before names were): its console
            # endpoint is new; read it from the live domain.
            try:
                vm_console_record(vm, driver)
            except HypervisorError as error:  # the next pass tries again
                log.warning("reconcile: no console endpoint for %s: %s", vm, error)
        vm_observe(vm, state, message)
        if vm.desired_state == DesiredState.RUNNING and state in (
            ObservedState.SHUTOFF,
            ObservedState.CRASHED,
        ):
            dispatch.operation_create(vm=vm, kind=OperationKind.START, by=None)
            report.restarted += 1
    return report


def vms_place_waiting() -> int:
    """Place VMs that waited for capacity, and send their provisioning."""
    placed = 0
    for vm in Vm.objects.live().filter(host__isnull=True):
        if placement.vm_place(vm=vm):
            placed += 1
            events.vm_changed(vm=vm)
            for op in vm.operations.filter(status=OperationStatus.QUEUED):
                dispatch.operation_send(operation_id=op.pk)
    return placed


def reconcile_all() -> tuple[int, list[ReconcileReport]]:
    """Place waiting VMs, then reconcile every host that is enabled or holds VMs."""
    placed = vms_place_waiting()
    hosts = Host.objects.filter(Q(enabled=True) | Q(vms__isnull=False)).distinct()
    return placed, [host_reconcile(host=host) for host in hosts]
