"""Nothing lost when the broker fails: a private Redis on another loopback port is the
Celery broker of this test and of its real worker, and is stopped and restarted under
them while a real guest is provisioned and operated.

(a) the broker is down when the request is made: the request answers, the operation
    waits queued, and the outbox's sweeper delivers it once the broker is back;
(b) the broker restarts (without persistence) with an operation's message in it: the
    message is lost, the sweeper sends it again, the operation runs once;
(c) Redis (broker and channel layer of the worker) is killed while an operation runs:
    the operation still ends, and the worker takes new work once Redis is back.
Afterwards the VM's row and libvirt agree, and there is one domain for the VM.
"""

import os
import signal
import socket
import subprocess
import time

import pytest
from celery import current_app
from django.db import connection

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.compute import dispatch
from labs.compute.requests import vm_operation_request
from labs.models import Operation

from .conftest import PREFIX, Worker, _db_env, approve_new_group, wait_for, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


class PrivateRedis:
    """A redis-server of this test's own on 127.0.0.1, started and stopped by its PID."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=10, what="the private Redis to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # as a crash would: nothing saved
            self.proc.wait(timeout=10)


def _use_broker(url: str) -> str:
    app = current_app._get_current_object()
    old = app.conf.broker_url
    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None
    return old


@pytest.fixture
def broker():
    redis = PrivateRedis()
    redis.start()
    old = _use_broker(redis.url)
    yield redis
    _use_broker(old)
    redis.stop()


@pytest.fixture
def idle_broker_worker(broker, transactional_db):
    """A worker whose every Redis (broker, channel layer, tickets) is the private one;
    not started yet."""
    env = {
        **_db_env(),
        "CELERY_BROKER_URL": broker.url,
        "REDIS_URL": broker.url,
        "CHANNEL_LAYER_URL": broker.url,
    }
    worker = Worker(connection.settings_dict["NAME"], env)
    yield worker
    worker.stop()


@pytest.fixture
def broker_worker(idle_broker_worker):
    idle_broker_worker.start()
    return idle_broker_worker


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    )


def sweep_until_claimed(op, *, timeout: float = 60) -> None:
    """Beat's job, done here every second: send again whatever stays unclaimed."""

    def claimed():
        dispatch.operations_resend(now=None)
        op.refresh_from_db()
        return op.status != OperationStatus.QUEUED

    wait_for(claimed, timeout=timeout, interval=1, what=f"{op} to be claimed")


def test_a_broker_down_or_restarted_delays_operations_and_loses_none(
    course, alice, ines, qemu_host, debian_template, broker, broker_worker, group_keypair, settings
):
    _, public = group_keypair
    # (a) The broker is down when the group is approved: approval answers, the provision
    # waits queued with the reason, and runs once the broker is back.
    broker.stop()
    vm, provision = approve_new_group(course, by=alice, reviewer=ines, name="C", public_key=public)
    provision.refresh_from_db()
    assert provision.status == OperationStatus.QUEUED
    assert provision.send_error == dispatch.QUEUE_DOWN
    assert "waiting for the task queue" in provision.waiting
    broker.start()
    time.sleep(dispatch.RESEND_GRACE)
    sweep_until_claimed(provision)
    wait_operation(provision, timeout=180)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING

    # (b) The worker is away and the broker restarts, losing the queued message.
    broker_worker.stop()
    stop = vm_operation_request(vm=vm, kind=OperationKind.FORCE_OFF, by=alice)
    stop.refresh_from_db()
    assert stop.send_error == "" and stop.send_attempts == 1  # the broker took it
    broker.stop()
    broker.start()  # nothing kept: the message is gone
    broker_worker.start()
    time.sleep(3)
    stop.refresh_from_db()
    assert stop.status == OperationStatus.QUEUED  # nobody had it
    time.sleep(dispatch.RESEND_GRACE)
    sweep_until_claimed(stop)
    wait_operation(stop, timeout=60)
    assert stop.attempts == 1  # ran once

    # The row and the host agree; one domain for the VM.
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    assert virsh("domstate", vm.domain_name).stdout.strip() == "shut off"
    names = [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith(PREFIX)]
    assert names == [vm.domain_name]
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))


# The provision pauses here (the domain is defined, not started) while Redis is killed.
PAUSE_AT = "provision:starting VM"


@pytest.mark.sqlite_pass_only
def test_redis_killed_while_an_operation_runs_ends_it_and_the_worker_carries_on(
    course, alice, ines, qemu_host, debian_template, broker, idle_broker_worker, group_keypair
):
    _, public = group_keypair
    idle_broker_worker.start(STRATUS_FAILPOINTS=f"{PAUSE_AT}:6")
    vm, provision = approve_new_group(course, by=alice, reviewer=ines, name="R", public_key=public)

    def paused_midway():
        provision.refresh_from_db()
        return provision.progress == PAUSE_AT.split(":", 1)[1]

    wait_for(paused_midway, timeout=60, what="the provision to reach its pause")
    assert provision.status == OperationStatus.RUNNING
    broker.stop()  # SIGKILL: the worker's broker connection, its unacked message and its
    # channel layer go with it; the provision goes on from its pause without them.

    def ended():
        provision.refresh_from_db()
        return provision.status not in (OperationStatus.QUEUED, OperationStatus.RUNNING)

    wait_for(ended, timeout=60, what=f"{provision} to end with Redis down")
    assert provision.status == OperationStatus.SUCCEEDED, provision.error
    assert provision.attempts == 1
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.RUNNING
    assert virsh("domstate", vm.domain_name).stdout.strip() == "running"

    # Redis comes back empty; the worker reconnects by itself and takes the next operation.
    broker.start()
    stop = vm_operation_request(vm=vm, kind=OperationKind.FORCE_OFF, by=alice)
    sweep_until_claimed(stop, timeout=90)  # in case the first send met a stale connection
    wait_operation(stop, timeout=60)
    assert stop.attempts == 1
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    assert virsh("domstate", vm.domain_name).stdout.strip() == "shut off"
    names = [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith(PREFIX)]
    assert names == [vm.domain_name]
    assert not Operation.objects.filter(status=OperationStatus.RUNNING).exists()
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
