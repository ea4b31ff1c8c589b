"""Live events: what is published, to which channel-layer groups, and when.

A ``Listener`` subscribes to channel-layer groups on the real Redis layer (each test has
its own prefix, tests/conftest.py) and records what arrives: the wire, not the function
calls. Operations are not handed to Celery here (``no_broker``).
"""

import asyncio
import json
import logging
import queue
import threading

import pytest
from channels.layers import get_channel_layer
from django.db import transaction

from labs.choices import ObservedState, OperationKind
from labs.compute import reconcile, requests, runner
from labs.live import events
from labs.models import Group, Image, Membership, Operation, Vm, VmTemplate
from labs.people.groups import group_approve, membership_group_set
from tests.compute.test_vms import make_host

OPERATION_FIELDS = {
    "type", "group", "course", "group_name", "vm", "vm_name", "operation", "kind",
    "kind_display",
    "status", "status_display", "progress", "error",
}  # fmt: skip
VM_FIELDS = {
    "type", "group", "course", "group_name", "vm", "vm_name", "state", "state_display",
    "message",
}  # fmt: skip


class Listener:
    """Listens on channel-layer groups from its own event loop (a thread), like a consumer
    in another process would."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.received: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Listener":
        self._thread.start()
        assert self._ready.wait(10), "the listener did not subscribe"
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._listen())
        finally:
            self._loop.close()  # closes the layer's connection of this loop

    async def _listen(self) -> None:
        self._task = asyncio.current_task()
        layer = get_channel_layer()
        channel = await layer.new_channel()
        for name in self.names:
            await layer.group_add(name, channel)
        # A round trip through Redis: every subscription is active before the test goes on.
        for name in self.names:
            await layer.group_send(name, {"type": "probe", "name": name})
        for _ in self.names:
            await layer.receive(channel)
        self._ready.set()
        try:
            while True:
                self.received.put(await layer.receive(channel))
        except asyncio.CancelledError:
            pass

    def payloads(self, *, count: int, timeout: float = 5) -> list[dict]:
        """The payloads of the next ``count`` events (fails if they do not come); the
        pushed regions in between are tests/live/test_regions.py's."""
        got = []
        while len(got) < count:
            payload = self.received.get(timeout=timeout)["payload"]
            if payload.get("type") != "regions":
                got.append(payload)
        return got

    def messages_within(self, seconds: float) -> list[dict]:
        """Every event (not the pushed regions) that arrives within ``seconds``."""
        got = []
        try:
            while True:
                message = self.received.get(timeout=seconds)
                if message.get("payload", {}).get("type") != "regions":
                    got.append(message)
        except queue.Empty:
            return got


@pytest.fixture
def listen():
    listeners = []

    def start(*names: str) -> Listener:
        listener = Listener(list(names)).start()
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.stop()


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    """No operation goes to Celery's broker from these tests (no worker runs them)."""
    sent = []

    def send(operation_id):
        sent.append(operation_id)
        return ""

    monkeypatch.setattr("labs.compute.dispatch.task_send", send)
    return sent


@pytest.fixture
def vm_a(group_a, group_b, make_vm):
    Group.objects.filter(pk=group_b.pk).update(status="approved")
    return make_vm(group_a, name="vm1", ssh_port=22000, vnc_host="127.0.0.1", vnc_port=5901)


@pytest.fixture
def vm_on_test_driver(group_a, ines, course, tmp_path):
    """Group A approved, its VM placed on libvirt's test driver, provision queued."""
    image = Image.objects.create(
        name="deb", os="Debian 12", path=str(tmp_path / "base" / "base.qcow2"), size_gib=2
    )
    VmTemplate.objects.create(
        course=course, image=image, count=1, vcpus=1, memory_mib=1024, disk_gib=10
    )
    make_host("h1", tmp_path=tmp_path)
    group_approve(group=group_a, by=ines)
    return Vm.objects.get(group=group_a)


UNREACHABLE = "qemu+tcp://127.0.0.1:1/system"


def unreachable(host):
    """The host, now at an address where no libvirt answers."""
    type(host).objects.filter(pk=host.pk).update(uri=UNREACHABLE)
    host.refresh_from_db()
    return host


def group_of(group) -> str:
    return events.group_channel(group.pk)


def course_of(group) -> str:
    return events.course_channel(group.course_id)


# --- payloads and where they go --------------------------------------------------------------


@pytest.mark.django_db
def test_a_queued_operation_reaches_its_group_and_course_staff_with_only_what_the_page_shows(
    vm_a, group_a, group_b, alice, listen, django_capture_on_commit_callbacks
):
    members, staff = listen(group_of(group_a)), listen(course_of(group_a))
    other_group = listen(group_of(group_b))
    with django_capture_on_commit_callbacks(execute=True):
        op = requests.vm_operation_request(
            vm=vm_a, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "before-lab"}
        )
    expected = {
        "type": "operation",
        "group": group_a.pk,
        "course": group_a.course_id,
        "group_name": group_a.name,
        "vm": vm_a.pk,
        "vm_name": "vm1",
        "operation": op.pk,
        "kind": "snapshot",
        "kind_display": "Snapshot",
        "status": "queued",
        "status_display": "Queued",
        "progress": "",
        "error": "",
    }
    assert members.payloads(count=1) == [expected]
    assert staff.payloads(count=1) == [expected]
    assert other_group.messages_within(0.5) == []


@pytest.mark.django_db
def test_payloads_carry_no_keys_ports_endpoints_uris_or_workers(
    vm_a, group_a, alice, listen, django_capture_on_commit_callbacks
):
    members = listen(group_of(group_a))
    host = unreachable(vm_a.host)
    with django_capture_on_commit_callbacks(execute=True):
        op = requests.vm_operation_request(vm=vm_a, kind=OperationKind.REBOOT, by=alice)
        runner.operation_claim(operation_id=op.pk, worker="h1@worker-7/abc")
        reconcile.host_reconcile(host=host)  # the host does not answer: the VM is unknown
    payloads = members.payloads(count=3)
    assert [set(p) for p in payloads] == [OPERATION_FIELDS, OPERATION_FIELDS, VM_FIELDS]
    wire = json.dumps(payloads)
    group_a.refresh_from_db()
    for secret in [
        group_a.ssh_public_key.split()[1],
        group_a.ssh_key_fingerprint,
        "22000",
        "5901",
        UNREACHABLE,
        "worker-7",
        "alice",
    ]:
        assert secret not in wire


@pytest.mark.django_db(transaction=True)
def test_a_worker_run_publishes_running_progress_and_succeeded_and_the_vm_state(
    vm_on_test_driver, group_a, listen
):
    members = listen(group_of(group_a))
    provision = vm_on_test_driver.operations.get()
    outcome = runner.operation_run(operation_id=provision.pk, worker="t/1", may_retry=True)
    assert outcome.status == "succeeded"
    got = [m["payload"] for m in members.messages_within(1.0)]
    statuses = [p["status"] for p in got if p["type"] == "operation"]
    assert statuses[0] == "running" and statuses[-1] == "succeeded"
    progress = [p["progress"] for p in got if p["type"] == "operation" and p["progress"]]
    assert progress and progress[-1] == "done"
    states = [p["state"] for p in got if p["type"] == "vm"]
    assert states == [ObservedState.RUNNING]
    assert {p["vm_name"] for p in got} == {"vm1"}


@pytest.mark.django_db(transaction=True)
def test_a_failed_operation_says_why_without_the_hosts_uri(vm_on_test_driver, group_a, listen):
    Image.objects.update(path="/nonexistent/base.qcow2")
    members = listen(group_of(group_a))
    provision = vm_on_test_driver.operations.get()
    assert runner.operation_run(
        operation_id=provision.pk, worker="t/1", may_retry=True
    ).status == ("failed")
    last = [m["payload"] for m in members.messages_within(1.0)][-1]
    assert (last["status"], last["status_display"]) == ("failed", "Failed")
    assert "/nonexistent/base.qcow2" in last["error"]
    assert "test://" not in json.dumps(last)


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_host_announces_the_retry_and_the_vms_unknown_state(
    vm_on_test_driver, group_a, listen
):
    unreachable(vm_on_test_driver.host)
    members = listen(group_of(group_a))
    provision = vm_on_test_driver.operations.get()
    assert runner.operation_run(
        operation_id=provision.pk, worker="t/1", may_retry=True
    ).status == ("retry")
    retry = [m["payload"] for m in members.messages_within(1.0)][-1]
    assert (retry["status"], retry["progress"]) == ("queued", "waiting to retry")
    assert "did not answer" in retry["error"] and UNREACHABLE not in retry["error"]
    # The last try gives up: the operation failed, the VM's state is unknown.
    assert runner.operation_run(
        operation_id=provision.pk, worker="t/1", may_retry=False
    ).status == ("failed")
    got = [m["payload"] for m in members.messages_within(1.0)]
    assert [p["status"] for p in got if p["type"] == "operation"][-1] == "failed"
    assert [p["state"] for p in got if p["type"] == "vm"] == ["unknown"]
    assert UNREACHABLE not in json.dumps(got)


@pytest.mark.django_db
def test_reconcile_announces_only_changes(
    vm_a, group_a, listen, django_capture_on_commit_callbacks
):
    members = listen(group_of(group_a))
    host = unreachable(vm_a.host)
    with django_capture_on_commit_callbacks(execute=True):
        reconcile.host_reconcile(host=host)  # running → unknown: news
    assert [(p["type"], p["state"]) for p in members.payloads(count=1)] == [("vm", "unknown")]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        reconcile.host_reconcile(host=host)  # still unknown: nothing to say
    assert callbacks == []
    assert members.messages_within(0.5) == []


@pytest.mark.django_db
def test_a_recovered_operation_is_announced_queued_again(
    vm_a, group_a, alice, listen, django_capture_on_commit_callbacks
):
    op = requests.vm_operation_request(vm=vm_a, kind=OperationKind.REBOOT, by=alice)
    runner.operation_claim(operation_id=op.pk, worker="node1@h/dead")
    members = listen(group_of(group_a))
    with django_capture_on_commit_callbacks(execute=True):
        runner.operations_recover(worker_prefix="node1@h/", alive_worker="node1@h/new")
    [payload] = members.payloads(count=1)
    assert (payload["operation"], payload["status"]) == (op.pk, "queued")
    assert payload["progress"] == "re-queued after a worker crash"


# --- groups and access --------------------------------------------------------------------------


@pytest.mark.django_db
def test_approval_tells_the_group_and_the_staff(
    group_a, ines, listen, django_capture_on_commit_callbacks
):
    members, staff = listen(group_of(group_a)), listen(course_of(group_a))
    with django_capture_on_commit_callbacks(execute=True):
        group_approve(group=group_a, by=ines)
    expected = {
        "type": "group",
        "group": group_a.pk,
        "course": group_a.course_id,
        "status": "approved",
        "status_display": "Approved",
    }
    assert members.payloads(count=1) == [expected]
    assert staff.payloads(count=1) == [expected]


@pytest.mark.django_db
def test_a_member_taken_out_of_a_group_gets_an_access_change_and_the_group_a_change(
    group_a, bob, ines, listen, django_capture_on_commit_callbacks
):
    bobs_connections, members = listen(events.user_channel(bob.pk)), listen(group_of(group_a))
    membership = Membership.objects.get(user=bob, group=group_a)
    with django_capture_on_commit_callbacks(execute=True):
        membership_group_set(membership=membership, group=None, by=ines)
    assert bobs_connections.received.get(timeout=5) == {"type": events.ACCESS_MESSAGE}
    assert members.payloads(count=1)[0]["type"] == "group"


@pytest.mark.django_db
def test_signing_up_a_group_changes_the_access_of_every_member(
    course, dave, make_student, listen, make_public_key, django_capture_on_commit_callbacks
):
    from labs.people.groups import group_register

    erin = make_student("erin")
    daves, erins = listen(events.user_channel(dave.pk)), listen(events.user_channel(erin.pk))
    with django_capture_on_commit_callbacks(execute=True):
        group_register(
            course=course,
            by=dave,
            name="Delta",
            member_usernames=["erin"],
            project_title="t",
            project_idea="i",
            ssh_public_key=make_public_key("delta"),
        )
    assert daves.received.get(timeout=5) == {"type": events.ACCESS_MESSAGE}
    assert erins.received.get(timeout=5) == {"type": events.ACCESS_MESSAGE}


@pytest.mark.django_db
def test_channels_follow_membership_and_staff_roles(group_a, group_b, alice, carol, ines, dave):
    course = group_a.course_id
    assert events.channels_for(user=alice) == {
        f"events.user.{alice.pk}",
        f"events.group.{group_a.pk}",
    }
    assert events.channels_for(user=carol) == {
        f"events.user.{carol.pk}",
        f"events.group.{group_b.pk}",
    }
    assert events.channels_for(user=ines) == {f"events.user.{ines.pk}", f"events.course.{course}"}
    assert events.channels_for(user=dave) == {f"events.user.{dave.pk}"}


# --- after commit only, and never at the caller's expense ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_nothing_is_published_when_the_transaction_rolls_back(vm_a, group_a, alice, listen):
    members = listen(group_of(group_a))
    with pytest.raises(RuntimeError), transaction.atomic():
        requests.vm_operation_request(vm=vm_a, kind=OperationKind.REBOOT, by=alice)
        raise RuntimeError("the request failed after the operation was written")
    assert not Operation.objects.exists()
    assert members.messages_within(0.5) == []
    # The same request, committed, is published: the listener does hear.
    op = requests.vm_operation_request(vm=vm_a, kind=OperationKind.REBOOT, by=alice)
    assert members.payloads(count=1)[0]["operation"] == op.pk


@pytest.fixture
def redis_down(settings):
    layers = {**settings.CHANNEL_LAYERS}
    layers["default"] = {
        **layers["default"],
        "CONFIG": {
            **layers["default"]["CONFIG"],
            "hosts": ["redis://:not-a-real-password@127.0.0.1:1/0"],
        },
    }
    settings.CHANNEL_LAYERS = layers


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_an_operation_runs_to_the_end_and_a_warning_is_logged(
    vm_on_test_driver, redis_down, caplog
):
    provision = vm_on_test_driver.operations.get()
    with caplog.at_level(logging.WARNING, logger="labs.live.events"):
        outcome = runner.operation_run(operation_id=provision.pk, worker="t/1", may_retry=True)
    assert outcome.status == "succeeded"
    vm_on_test_driver.refresh_from_db()
    assert vm_on_test_driver.observed_state == ObservedState.RUNNING
    warnings = [r for r in caplog.records if r.name == "labs.live.events"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "not published" in warnings[0].getMessage()
    assert "not-a-real-password" not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_a_force_off_still_powers_the_vm_off(
    vm_on_test_driver, redis_down, caplog
):
    provision = vm_on_test_driver.operations.get()
    runner.operation_run(operation_id=provision.pk, worker="t/1", may_retry=True)
    force_off = requests.vm_operation_request(vm=vm_on_test_driver, kind="force_off", by=None)
    with caplog.at_level(logging.WARNING, logger="labs.live.events"):
        outcome = runner.operation_run(operation_id=force_off.pk, worker="t/1", may_retry=True)
    assert outcome.status == "succeeded"
    vm_on_test_driver.refresh_from_db()
    assert vm_on_test_driver.observed_state == ObservedState.SHUTOFF
    # The consoles' revocation could not be sent either; it is logged, not raised.
    assert f"console.vm.{vm_on_test_driver.pk}" in caplog.text


@pytest.mark.django_db
def test_with_redis_down_a_member_still_queues_an_operation_from_the_page(
    vm_a, group_a, alice, client_for, redis_down, caplog, django_capture_on_commit_callbacks
):
    from django.urls import reverse

    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(alice).post(
            reverse("labs:vm_operation", args=[vm_a.pk, "reboot"]), follow=True
        )
    assert response.status_code == 200 and "Reboot of vm1 is queued." in response.content.decode()
    assert Operation.objects.get(vm=vm_a).status == "queued"
    assert "live event not published" in caplog.text


def test_the_channel_names_are_the_documented_ones():
    assert events.group_channel(12) == "events.group.12"
    assert events.course_channel(3) == "events.course.3"
    assert events.user_channel(7) == "events.user.7"


def test_a_ta_hears_the_course_and_a_ta_of_another_course_does_not(course, group_a, tara, otto):
    assert events.course_channel(course.pk) in events.channels_for(user=tara)
    assert (
        events.channels_for(user=otto)
        & {
            events.course_channel(course.pk),
            events.group_channel(group_a.pk),
        }
        == set()
    )
