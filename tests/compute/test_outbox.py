"""The operations outbox: a broker that is away delays an operation and never loses it.

The broker is made unreachable for real (Celery pointed at a closed loopback port), not
mocked: what the request, the row and the page do then is what a student would see.
"""

import socket
from datetime import timedelta

import pytest
from celery import current_app
from django.urls import reverse
from django.utils import timezone

from labs.choices import OperationKind, OperationStatus
from labs.compute import dispatch, runner
from labs.compute.requests import vm_operation_request
from labs.models import Operation

pytestmark = pytest.mark.django_db


def _reset_pools(app) -> None:
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def broker_down():
    """Celery's broker at a loopback port nothing listens on, for this test."""
    app = current_app._get_current_object()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = app.conf.broker_url
    app.conf.broker_url = f"redis://127.0.0.1:{port}/0"
    _reset_pools(app)
    yield
    app.conf.broker_url = old
    _reset_pools(app)


@pytest.mark.django_db(transaction=True)  # the delivery runs at commit, as in production
def test_a_request_while_the_broker_is_down_answers_and_waits_queued(
    client_for, alice, group_a, make_vm, broker_down
):
    vm = make_vm(group_a)
    response = client_for(alice).post(
        reverse("labs:vm_operation", args=[vm.pk, "reboot"]), follow=True
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "Reboot of vm1 is queued; it starts when the task queue is back." in page
    op = Operation.objects.get(vm=vm)
    assert (op.status, op.send_attempts, op.send_error) == (
        OperationStatus.QUEUED,
        1,
        dispatch.QUEUE_DOWN,
    )
    assert "waiting for the task queue since" in op.waiting


def test_the_group_page_and_the_overview_say_what_an_operation_waits_for(
    client_for, alice, ines, group_a, make_vm, sent
):
    vm = make_vm(group_a)
    op = vm_operation_request(vm=vm, kind=OperationKind.REBOOT, by=alice)
    Operation.objects.filter(pk=op.pk).update(send_error=dispatch.QUEUE_DOWN)
    group_page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk]))
    assert "waiting for the task queue since" in group_page.content.decode()
    overview = client_for(ines).get(reverse("labs:course_overview", args=[group_a.course.slug]))
    assert "Reboot: queued — waiting for the task queue since" in overview.content.decode()


def test_the_sweeper_sends_again_what_stays_queued_past_its_backoff(alice, group_a, make_vm, sent):
    now = timezone.now()
    vm1, vm2, vm3 = (make_vm(group_a, name=f"vm{n}") for n in (1, 2, 3))
    lost = vm_operation_request(vm=vm1, kind=OperationKind.REBOOT, by=alice)
    fresh = vm_operation_request(vm=vm2, kind=OperationKind.REBOOT, by=alice)
    claimed = vm_operation_request(vm=vm3, kind=OperationKind.REBOOT, by=alice)
    assert sent == [lost.pk, fresh.pk, claimed.pk]
    Operation.objects.filter(pk=lost.pk).update(sent_at=now - timedelta(seconds=11))
    Operation.objects.filter(pk=claimed.pk).update(
        sent_at=now - timedelta(seconds=11), status=OperationStatus.RUNNING
    )

    Operation.objects.filter(pk=fresh.pk).update(sent_at=now)
    assert dispatch.operations_resend(now=now) == [lost.pk]
    assert sent[-1] == lost.pk
    Operation.objects.filter(pk=lost.pk).update(sent_at=now)
    # The fresh one is due after the grace; the lost one, sent twice, waits twice as long.
    assert dispatch.operations_resend(now=now + timedelta(seconds=15)) == [fresh.pk]
    assert lost.pk in dispatch.operations_resend(now=now + timedelta(seconds=21))
    assert claimed.pk not in dispatch.operations_resend(now=now + timedelta(hours=1))


def test_a_duplicate_delivery_runs_the_operation_once(alice, group_a, make_vm, sent):
    vm = make_vm(group_a, observed_state="shutoff")
    op = vm_operation_request(vm=vm, kind=OperationKind.START, by=alice)
    dispatch.operation_deliver(operation_id=op.pk)  # the sweeper's copy
    assert sent == [op.pk, op.pk]
    claims = [runner.operation_claim(operation_id=op.pk, worker=f"w{n}/1") for n in (1, 2)]
    assert [c is not None for c in claims] == [True, False]


def test_the_console_says_it_cannot_open_while_redis_is_away(
    client_for, alice, group_a, make_vm, settings
):
    vm = make_vm(group_a, vnc_socket="/run/x.sock")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    response = client_for(alice).post(reverse("labs:vm_console_ticket", args=[vm.pk]))
    assert response.status_code == 503
    assert "cannot open right now" in response.json()["error"]
