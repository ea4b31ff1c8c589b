"""Requesting work from the workers: the Operation row, its event, the task sent by name.

The row is the truth; sending the Celery task is a delivery attempt made after the
transaction commits. The task is sent by name (``OPERATION_TASK``), so nothing here
imports ``labs.tasks``, and its queue is chosen by ``route_task`` (Celery's router,
settings.CELERY_TASK_ROUTES): the operation's host's own queue, ``Host.queue``.
"""

import logging

from celery import current_app
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from labs.choices import ACTIVE_OPERATION_STATUSES
from labs.errors import Busy
from labs.live import events
from labs.models import Host, Operation, Vm

log = logging.getLogger(__name__)

OPERATION_TASK = "labs.tasks.operation_run_task"


def operation_create(
    *, vm: Vm, kind: str, by: AbstractBaseUser | None, params: dict | None = None
) -> Operation:
    """Write the Operation row (Busy when the VM has one active already), announce it and
    send it to its host's worker once the transaction commits (a VM not placed yet waits:
    placement sends it)."""
    try:
        with transaction.atomic():
            op = Operation.objects.create(vm=vm, kind=kind, requested_by=by, params=params or {})
    except IntegrityError:
        active = vm.operations.filter(status__in=ACTIVE_OPERATION_STATUSES).first()
        what = active.get_kind_display().lower() if active else "another operation"
        raise Busy(
            f"{vm.name} is busy ({what} in progress); try again when it has finished."
        ) from None
    events.operation_changed(operation=op)
    if vm.host_id is not None:
        operation_send(operation_id=op.pk)
    return op


def operation_send(*, operation_id: int) -> None:
    """Send the operation's task after the current transaction (at once outside one)."""

    def send() -> None:
        task_id = task_send(operation_id)
        Operation.objects.filter(pk=operation_id).update(celery_task_id=task_id)

    transaction.on_commit(send)


def task_send(operation_id: int) -> str:
    """Hand the operation to the broker (its router picks the queue); the task's id."""
    return current_app.send_task(OPERATION_TASK, args=[operation_id]).id or ""


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery's router: each VM operation to its host's queue (``Host.queue``), the rest
    to ``default``."""
    if name == OPERATION_TASK and args:
        host = Host.objects.filter(vms__operations=args[0]).first()
        if host is not None:
            return {"queue": host.queue}
    return {"queue": "default"}
