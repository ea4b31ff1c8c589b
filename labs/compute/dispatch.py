"""Requesting work from the workers: the Operation row, its event, the task sent by name.

An outbox: the row is the truth; sending the Celery task is a delivery attempt made after
the transaction commits, and it never fails the request that asked (a broker that does
not answer leaves the row queued with ``send_error`` set). The sweeper
(``operations_resend``, from beat every few seconds) sends again every operation that is
still queued and unclaimed past a short grace, with backoff; a duplicate delivery is
harmless because the runner claims a row only once (``queued → running``).

The task is sent by name (``OPERATION_TASK``), so nothing here imports ``labs.tasks``,
and its queue is chosen by ``route_task`` (Celery's router, settings.CELERY_TASK_ROUTES):
the operation's host's own queue, ``Host.queue``.
"""

import logging
from datetime import timedelta

from celery import current_app
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from labs.choices import ACTIVE_OPERATION_STATUSES, OperationStatus
from labs.errors import Busy
from labs.live import events
from labs.models import Host, Operation, Vm

log = logging.getLogger(__name__)

OPERATION_TASK = "labs.tasks.operation_run_task"
RESEND_GRACE = 10  # seconds a sent operation may stay unclaimed before it is sent again
RESEND_MAX_BACKOFF = 300  # seconds between sends at most, for an operation waiting long
QUEUE_DOWN = "the task queue did not answer"


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
    transaction.on_commit(lambda: operation_deliver(operation_id=operation_id))


def operation_deliver(*, operation_id: int) -> bool:
    """One delivery attempt, recorded on the row; never raises. False: the broker did not
    take it (the sweeper tries again)."""
    now = timezone.now()
    try:
        task_id = task_send(operation_id)
    except Exception as error:  # kombu/redis errors of every kind: the broker is away
        log.warning(
            "operation %s not sent (%s); it waits for the task queue",
            operation_id,
            type(error).__name__,
        )
        updated = Operation.objects.filter(pk=operation_id, status=OperationStatus.QUEUED)
        updated.update(sent_at=now, send_attempts=F("send_attempts") + 1, send_error=QUEUE_DOWN)
        op = Operation.objects.filter(pk=operation_id).first()
        if op is not None:
            events.operation_changed(operation=op)
        return False
    Operation.objects.filter(pk=operation_id).update(
        celery_task_id=task_id, sent_at=now, send_attempts=F("send_attempts") + 1, send_error=""
    )
    return True


def resend_backoff(attempts: int) -> float:
    """Seconds after the last send before sending again: 10, 20, 40, ... up to 5 minutes."""
    return min(RESEND_GRACE * 2 ** max(attempts - 1, 0), RESEND_MAX_BACKOFF)


def operations_resend(*, now=None) -> list[int]:
    """The sweeper: send again every operation queued and unclaimed past its backoff.

    Covers a broker that was down when the request was made, a message lost by a broker
    restart, and a worker that took a message and died before claiming it. An operation
    on a VM not placed yet waits for placement instead (reconcile sends it).
    """
    now = now or timezone.now()
    stale = Q(sent_at__isnull=True, created_at__lte=now - timedelta(seconds=RESEND_GRACE))
    for attempts in range(0, 9):  # one window per backoff step; 5 min from the 6th on
        window = now - timedelta(seconds=resend_backoff(attempts))
        attempts_q = Q(send_attempts=attempts) if attempts < 8 else Q(send_attempts__gte=8)
        stale |= attempts_q & Q(sent_at__lte=window)
    due = list(
        Operation.objects.filter(status=OperationStatus.QUEUED, vm__host__isnull=False)
        .filter(stale)
        .order_by("created_at")
        .values_list("pk", flat=True)[:500]
    )
    for operation_id in due:
        operation_deliver(operation_id=operation_id)
    return due


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
