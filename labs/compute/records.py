"""What workers write back about a VM: its observed state, its console endpoint, an
operation's progress. Executors and reconcile both record through here, so a state change
is always published and a VM that stops always loses its consoles."""

import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.utils import timezone

from labs.choices import ObservedState, OperationStatus
from labs.consoles import tickets
from labs.drivers.base import Driver, HypervisorError, HypervisorUnavailable
from labs.drivers.registry import driver_for
from labs.live import events
from labs.models import Operation, StateChange, Vm

log = logging.getLogger(__name__)

# A driver's domain states as the pages show them.
DOMAIN_STATES = {
    "running": ObservedState.RUNNING,
    "blocked": ObservedState.RUNNING,
    "shutdown": ObservedState.RUNNING,  # shutting down, not yet off
    "paused": ObservedState.PAUSED,
    "suspended": ObservedState.PAUSED,
    "shutoff": ObservedState.SHUTOFF,
    "saved": ObservedState.SAVED,  # shut off with a managed save image
    "crashed": ObservedState.CRASHED,
}


NO_CONSOLE = {"vnc_host": "", "vnc_port": None, "vnc_socket": "", "vnc_name": ""}


def driver_of(vm: Vm) -> Driver:
    return driver_for(vm.host)


def observed_of(driver_state: str | None) -> str:
    """The ObservedState for a driver's domain state (None: the domain is missing)."""
    if driver_state is None:
        return ObservedState.MISSING
    return DOMAIN_STATES.get(driver_state, ObservedState.UNKNOWN)


def vm_observe(vm: Vm, state: str, message: str | None = None) -> None:
    """Record what the host holds; publish it when it changed (reconcile observes every VM
    every minute: only changes are news)."""
    changed = state != vm.observed_state or (message is not None and message != vm.status_message)
    fields = {"observed_state": state, "observed_at": timezone.now()}
    if message is not None:
        fields["status_message"] = message
    previous = vm.observed_state
    Vm.objects.filter(pk=vm.pk).update(**fields)
    vm.observed_state = state
    if state != previous:
        state_history(vm, state, fields["observed_at"])
    if changed:
        events.vm_changed(vm=vm)


def state_history(vm: Vm, state: str, at) -> None:
    """Append to the VM's state history (usage hours are read from it). A RUNNING row
    names who asked for the operation running now on the VM (none: it started itself, or
    the course clock or Stratus started it)."""
    started_by = None
    if state == ObservedState.RUNNING:
        started_by = (
            Operation.objects.filter(vm_id=vm.pk, status=OperationStatus.RUNNING)
            .order_by("-started_at")
            .values_list("requested_by_id", flat=True)
            .first()
        )
    StateChange.objects.create(vm_id=vm.pk, state=state, at=at, started_by_id=started_by)


def vm_console_record(vm: Vm, driver: Driver | None = None) -> None:
    """Keep the running VM's VNC endpoint where the console proxy reads it (the DB).

    A VM whose console cannot be read is still running: its console is just unavailable.
    """
    try:
        endpoint = (driver or driver_of(vm)).console(vm.domain_name)
    except HypervisorUnavailable:
        raise
    except HypervisorError as error:
        log.warning("no console endpoint for %s: %s", vm, error)
        Vm.objects.filter(pk=vm.pk).update(**NO_CONSOLE)
        return
    Vm.objects.filter(pk=vm.pk).update(
        vnc_host=endpoint.host if endpoint.kind == "tcp" else "",
        vnc_port=endpoint.port if endpoint.kind == "tcp" else None,
        vnc_socket=endpoint.path if endpoint.kind == "unix" else "",
        vnc_name=endpoint.desktop_name,
    )


def vm_consoles_close(vm: Vm, reason: str) -> None:
    """The VM is going away or changing under its consoles: end them, forget the endpoint."""
    Vm.objects.filter(pk=vm.pk).update(**NO_CONSOLE)
    tickets.console_revoke(vm_id=vm.pk, reason=reason)


def operation_progress(op: Operation) -> Callable[[str], None]:
    """A callback for the driver: each step goes on the row and out to the pages."""

    def report(message: str) -> None:
        Operation.objects.filter(pk=op.pk).update(progress=message[:200])
        events.operation_changed(operation=op)
        failpoint(f"{op.kind}:{message}")

    return report


def failpoint(name: str) -> None:
    """Test-only pauses (settings.STRATUS_FAILPOINTS); a no-op in every deployment."""
    for item in filter(None, settings.STRATUS_FAILPOINTS.split(",")):
        point, _, seconds = item.rpartition(":")
        if point == name:
            time.sleep(float(seconds))
