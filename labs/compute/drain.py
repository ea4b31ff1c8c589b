"""Draining a host: every VM on it moved to hosts with room, a few at a time.

The host is marked *draining* first (nothing new is placed there), then each of its VMs
is moved (labs.compute.moves: a running VM live, a stopped one cold), at most
``parallel`` at once. A VM that cannot move (no host has room, a running VM with
snapshots, a VM busy or in a state that cannot move) stays, with the reason; the drain
goes on with the others and ends with the list of what stayed. The host stays *draining*
until an operator clears it.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser

from labs.choices import OperationStatus
from labs.compute import placement
from labs.compute.moves import vm_move_request
from labs.errors import StratusError
from labs.models import Host, Operation, Vm


@dataclass
class DrainReport:
    host: str
    moved: list[str] = field(default_factory=list)  # "group/vm -> host"
    stayed: list[tuple[str, str]] = field(default_factory=list)  # ("group/vm", why)

    @property
    def drained(self) -> bool:
        return not self.stayed


def _label(vm: Vm) -> str:
    return f"{vm.group.name}/{vm.name}"


def host_drain(
    *,
    host: Host,
    by: AbstractBaseUser | None,
    parallel: int = 2,
    timeout: float = 3600,
    say: Callable[[str], None] = lambda _line: None,
) -> DrainReport:
    Host.objects.filter(pk=host.pk).update(draining=True)
    report = DrainReport(host=host.name)
    pending = list(Vm.objects.live().filter(host=host).select_related("group").order_by("pk"))
    say(f"{host.name} is draining: {len(pending)} VMs to move, {parallel} at a time")
    moving: dict[int, tuple[Vm, Operation]] = {}
    deadline = time.monotonic() + timeout
    while pending or moving:
        while pending and len(moving) < parallel:
            vm = pending.pop(0)
            target = placement.move_destination(vm=vm, away_from=host)
            if target is None:
                report.stayed.append((_label(vm), "no host that is up has room for it"))
                say(f"  {_label(vm)} stays: no host that is up has room for it")
                continue
            try:
                op = vm_move_request(vm=vm, to=target, by=by)
            except StratusError as error:
                report.stayed.append((_label(vm), str(error)))
                say(f"  {_label(vm)} stays: {error}")
                continue
            moving[vm.pk] = (vm, op)
            say(f"  {_label(vm)} -> {target.name} ({'live' if op.params['live'] else 'cold'})")
        if not moving:
            break
        if time.monotonic() > deadline:
            for vm, _op in moving.values():
                report.stayed.append((_label(vm), f"still moving after {timeout:.0f} s"))
            break
        time.sleep(1)
        for vm_pk, (vm, op) in list(moving.items()):
            op.refresh_from_db()
            if op.status == OperationStatus.SUCCEEDED:
                to = Host.objects.get(pk=op.params["host"]).name
                report.moved.append(f"{_label(vm)} -> {to}")
                say(f"  {_label(vm)} is on {to}")
                del moving[vm_pk]
            elif op.status == OperationStatus.FAILED:
                report.stayed.append((_label(vm), op.error))
                say(f"  {_label(vm)} stays: {op.error}")
                del moving[vm_pk]
    say(
        f"{host.name} is drained: no VM left"
        if report.drained
        else f"{host.name}: {len(report.moved)} moved, {len(report.stayed)} stayed"
    )
    return report
