"""Running operations in workers: claim, run, finish, retry, recover.

A Celery task (``labs.tasks.operation_run_task``) hands the runner an Operation id. The
runner claims the row with a conditional UPDATE (``queued → running``: a second delivery of
the same task finds nothing to claim), runs the executor its kind's catalogue entry names,
and records how it ended. It never leaves an operation ``running``: a transient driver
error, or a database that went away, puts it back to ``queued`` for the task to retry;
anything else ends it ``failed`` with a message a student can act on.
"""

import logging
import time
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from labs.choices import ObservedState, OperationStatus
from labs.compute import kinds, ssh_access
from labs.compute.records import vm_observe
from labs.drivers.base import HypervisorError, HypervisorUnavailable
from labs.errors import StratusError, message_of
from labs.live import events
from labs.models import Operation, Vm

log = logging.getLogger(__name__)

# Runs of one operation at most: counted on the row, so a message sent twice (the outbox
# sends again what looks lost) never gives an operation more tries.
MAX_ATTEMPTS = 6
# The database errors that mean "it is not answering", not "this operation is wrong".
DATABASE_GONE = (OperationalError, InterfaceError)
DATABASE_WAIT_SECONDS = 600
DATABASE_POLL_SECONDS = 2


@dataclass(frozen=True)
class RunOutcome:
    status: str  # "skipped" | "succeeded" | "failed" | "retry" | "requeued"
    error: str = ""


def operation_claim(*, operation_id: int, worker: str) -> Operation | None:
    """queued → running by a conditional UPDATE; None when another worker has it."""
    claimed = Operation.objects.filter(pk=operation_id, status=OperationStatus.QUEUED).update(
        status=OperationStatus.RUNNING,
        worker=worker,
        started_at=timezone.now(),
        attempts=F("attempts") + 1,
        error="",
    )
    if not claimed:
        return None
    op = Operation.objects.select_related("vm__host", "vm__image", "vm__group__course").get(
        pk=operation_id
    )
    events.operation_changed(operation=op)
    return op


def _finish(op: Operation, status: str, error: str = "", progress: str | None = None) -> None:
    fields = {"status": status, "error": error, "finished_at": timezone.now()}
    if progress is not None:
        fields["progress"] = progress
    Operation.objects.filter(pk=op.pk).update(**fields)
    events.operation_changed(operation=op)


def operation_run(*, operation_id: int, worker: str, may_retry: bool) -> RunOutcome:
    """Claim and run one Operation; record how it ended.

    A transient hypervisor error puts the operation back to ``queued`` (the task then
    retries it with backoff) while ``may_retry``; any other failure ends it ``failed``
    with a message a student can act on. Never leaves it ``running``.
    """
    op = operation_claim(operation_id=operation_id, worker=worker)
    if op is None:
        return RunOutcome("skipped")
    try:
        return _run(op, may_retry=may_retry)
    except DATABASE_GONE as error:
        _requeue_when_database_back(op, error)
        return RunOutcome("retry" if may_retry else "requeued", "the database was unreachable")


def _run(op: Operation, *, may_retry: bool) -> RunOutcome:
    try:
        kinds.CATALOGUE[op.kind].executor(op)
    except HypervisorUnavailable as error:
        message = events.without_host_uri(f"{error} — the host did not answer", op.vm)
        if may_retry and op.attempts < MAX_ATTEMPTS:
            Operation.objects.filter(pk=op.pk).update(
                status=OperationStatus.QUEUED,
                error=message,
                progress="waiting to retry",
                sent_at=timezone.now(),  # the task's retry is on its way: no resend yet
            )
            events.operation_changed(operation=op)
            return RunOutcome("retry", message)
        _finish(op, OperationStatus.FAILED, f"{message}; gave up after {op.attempts} tries.")
        vm_observe(op.vm, ObservedState.UNKNOWN)
        return RunOutcome("failed", message)
    except (HypervisorError, StratusError, ValidationError) as error:
        # Members read the message on their page: the host's name, not its libvirt URI.
        message = events.without_host_uri(message_of(error), op.vm)
        _finish(op, OperationStatus.FAILED, message)
        return RunOutcome("failed", message)
    except DATABASE_GONE:
        raise  # not the operation's fault: it runs again once the database is back
    except Exception:
        log.exception("operation %s (%s) crashed", op.pk, op.kind)
        _finish(op, OperationStatus.FAILED, "Internal error; the operators have the details.")
        raise
    # A VM that runs again (start, revert, …) gets the SSH access it missed at once. One
    # transaction: nobody sees the VM idle between the two (a request would slip in, a
    # page would show it free for a moment).
    with transaction.atomic():
        _finish(op, OperationStatus.SUCCEEDED, progress="done")
        ssh_access.syncs_request(Vm.objects.filter(pk=op.vm_id))
    return RunOutcome("succeeded")


def _requeue_when_database_back(op: Operation, error: Exception) -> None:
    """The database went away under a running operation (PostgreSQL restarted, say): its
    row cannot say how it ended. Wait for the database (up to DATABASE_WAIT_SECONDS) and
    put the operation back to ``queued``, so that it runs again from the start (every
    executor is safe to run again, as after a worker crash) instead of staying
    ``running`` under a live worker. Past the wait, the error goes up: the row stays
    ``running`` until this worker restarts and recovers it (operations_recover)."""
    first = (str(error).strip().splitlines() or [""])[0]
    log.warning(
        "operation %s (%s): the database went away (%s); re-queueing it once it is back",
        op.pk,
        op.kind,
        first,
    )
    deadline = time.monotonic() + DATABASE_WAIT_SECONDS
    while True:
        connection.close()  # the broken connection; the next query opens a new one
        try:
            Operation.objects.filter(pk=op.pk, status=OperationStatus.RUNNING).update(
                status=OperationStatus.QUEUED,
                progress="re-queued: the database was unreachable",
                sent_at=timezone.now(),  # the task's retry is on its way: no resend yet
            )
        except DATABASE_GONE:
            if time.monotonic() >= deadline:
                raise
            time.sleep(DATABASE_POLL_SECONDS)
            continue
        log.info("operation %s re-queued after the database came back", op.pk)
        events.operation_changed(operation=op)
        return


def operations_recover(*, worker_prefix: str, alive_worker: str) -> list[int]:
    """Re-queue operations a killed worker left ``running`` (called when a worker starts).

    ``worker_prefix`` names this worker node and ``alive_worker`` its current start (node
    plus a per-start id, shared by the pool's children): an operation the node claimed
    under an earlier start cannot still be running. Returns the ids to send again.
    """
    orphaned = list(
        Operation.objects.filter(status=OperationStatus.RUNNING, worker__startswith=worker_prefix)
        .exclude(worker=alive_worker)
        .values_list("pk", flat=True)
    )
    if orphaned:
        Operation.objects.filter(pk__in=orphaned, status=OperationStatus.RUNNING).update(
            status=OperationStatus.QUEUED, progress="re-queued after a worker crash"
        )
        for op in Operation.objects.filter(pk__in=orphaned):
            events.operation_changed(operation=op)
    return orphaned
