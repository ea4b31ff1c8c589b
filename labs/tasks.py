"""Celery entry points, and nothing else: take an id, let the runner claim and run it,
retry transient errors. Services are imported inside the entry points; the queue is
chosen by ``labs.compute.dispatch.route_task`` (settings.CELERY_TASK_ROUTES)."""

import logging
import os
import socket
import time

from celery import shared_task
from celery.signals import worker_ready
from django.db import DatabaseError

log = logging.getLogger(__name__)

MAX_RETRIES = 5
OPERATION_TASK = "labs.tasks.operation_run_task"  # labs.compute.dispatch sends it by name


# Made once per worker start, before the pool forks, so every child of one worker shares
# it and a restarted worker has a new one.
WORKER_BOOT = os.urandom(6).hex()


def _worker_id(hostname: str | None) -> str:
    return f"{hostname or socket.gethostname()}/{WORKER_BOOT}"


@shared_task(bind=True, name=OPERATION_TASK, acks_late=True, max_retries=MAX_RETRIES)
def operation_run_task(self, operation_id: int) -> str:
    from labs.compute import runner

    started = time.monotonic()
    try:
        outcome = runner.operation_run(
            operation_id=operation_id,
            worker=_worker_id(self.request.hostname),
            may_retry=self.request.retries < self.max_retries,
        )
    except Exception:
        _log_operation_run(operation_id, "crashed", started)
        raise
    _log_operation_run(operation_id, outcome.status, started)
    if outcome.status == "retry":
        # Exponential backoff: 2, 4, 8, 16, 32 seconds.
        raise self.retry(countdown=2 ** (self.request.retries + 1))
    return outcome.status


def _log_operation_run(operation_id: int, status: str, started: float) -> None:
    """One line per run of an operation: how it ended, read back from its row.

    The error is the student-facing message the row holds (no secrets); a run that
    crashed has its traceback logged by the service just before.
    """
    from labs.models import Operation

    try:
        row = (
            Operation.objects.filter(pk=operation_id)
            .values("kind", "vm_id", "attempts", "error")
            .first()
        ) or {}
    except DatabaseError:  # the line still says that the run ended, and how
        row = {}
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    log.log(
        logging.WARNING if status in ("failed", "crashed", "retry") else logging.INFO,
        "operation %s %s %s in %.1fms",
        operation_id,
        row.get("kind", "?"),
        status,
        duration_ms,
        extra={
            "event": "operation",
            "operation_id": operation_id,
            "kind": row.get("kind"),
            "vm_id": row.get("vm_id"),
            "status": status,
            "attempts": row.get("attempts"),
            "duration_ms": duration_ms,
            "error": row.get("error", "") if status != "succeeded" else "",
        },
    )


@shared_task(name="labs.tasks.reconcile_all", acks_late=True)
def reconcile_all() -> str:
    from labs.compute import reconcile

    placed, reports = reconcile.reconcile_all()
    return (
        "; ".join(
            f"{r.host}: {'ok' if r.reachable else 'unreachable'}, drift {len(r.drift or [])}"
            for r in reports
        )
        + f"; placed {placed}"
    )


@shared_task(name="labs.tasks.operations_resend", ignore_result=True)
def operations_resend() -> int:
    """Beat, every few seconds: send again what stays queued and unclaimed (the outbox),
    and ask for the SSH-access updates and the firewall changes that waited for their VM
    (their host's VMs) to run and be idle."""
    from labs.compute import dispatch, firewall, ssh_access

    return (
        len(dispatch.operations_resend())
        + ssh_access.syncs_due_request()
        + len(firewall.syncs_due_request())
    )


@worker_ready.connect
def recover_orphans(sender=None, **kwargs):
    """A worker that starts re-queues what a killed worker of the same node left running."""
    from labs.compute import dispatch, runner

    node = getattr(sender, "hostname", None) or socket.gethostname()
    for op_id in runner.operations_recover(
        worker_prefix=f"{node}/", alive_worker=_worker_id(node)
    ):
        log.warning("re-queueing operation %s left running by a killed worker", op_id)
        dispatch.operation_send(operation_id=op_id)


@shared_task(name="labs.tasks.course_clock_tick", ignore_result=True)
def course_clock_tick() -> int:
    """Beat, every minute: the course clock starts VMs before class and suspends or stops
    them after (labs/compute/clock.py); each decision once, however often it runs."""
    from labs.compute import clock

    return len(clock.clock_tick())


@shared_task(name="labs.tasks.term_tick", ignore_result=True)
def term_tick() -> int:
    """Beat, every minute: the deadline's final snapshots, the end of term's warning and
    archives (labs/compute/term.py); each request once, busy VMs next tick."""
    from labs.compute import term

    return term.term_tick()


@shared_task(name="labs.tasks.idle_tick", ignore_result=True)
def idle_tick() -> int:
    """Beat, every minute: idle VMs are warned about, then suspended to disk or shut down
    by the course clock (labs/compute/idle.py)."""
    from labs.compute import idle

    return len(idle.idle_tick())


@shared_task(name="labs.tasks.usage_tick", ignore_result=True)
def usage_tick() -> int:
    """Beat, every 5 minutes: the usage-hours quota warns groups at 80 % and suspends the
    running VMs to disk at 100 % (labs/compute/usage.py)."""
    from labs.compute import usage

    return len(usage.usage_tick())
