"""The live-events websocket (/ws/events/) for the cast, through the real ASGI application.

Each browser is a WebsocketCommunicator with a real session cookie and Origin, through
portal.asgi (Origin validator, session and auth middleware, router, EventsConsumer); the
events come from the real services, after commit, over the real Redis channel layer.
"""

import contextlib
import json
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from labs.choices import OperationKind, OperationStatus, Role
from labs.compute import requests, runner
from labs.models import Course, Group, Membership, Operation
from labs.people.groups import membership_group_set
from portal.asgi import application

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

ORIGIN = b"http://127.0.0.1:8000"
QUIET = 0.5  # seconds of silence that count as "received nothing"


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    """No operation goes to Celery's broker from these tests (no worker runs them)."""
    monkeypatch.setattr("labs.compute.dispatch.task_send", lambda operation_id: "")


@pytest.fixture
def cast(course, group_a, group_b, alice, bob, carol, dave, ines, make_vm):
    return SimpleNamespace(
        vm_a=make_vm(group_a, name="vm1", ssh_port=22000),
        vm_b=make_vm(group_b, name="vm1", ssh_port=22001),
        group_a=group_a,
        group_b=group_b,
    )


@database_sync_to_async
def session_of(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


class Page:
    """One page's events socket."""

    def __init__(self, communicator: WebsocketCommunicator, connected: bool) -> None:
        self.communicator = communicator
        self.connected = connected
        self.pushes: list[dict] = []

    async def next_event(self, timeout: float = 5) -> dict:
        """The next event, past the pushed regions (``pushes`` keeps those)."""
        while (event := await self.next_frame(timeout))["type"] == "regions":
            self.pushes.append(event)
        return event

    async def next_frame(self, timeout: float = 5) -> dict:
        return json.loads(await self.communicator.receive_from(timeout=timeout))

    async def next_event_but_ssh_updates(self, timeout: float = 5) -> dict:
        """The next event that is not the group's VMs asked to update SSH access (a move
        of a member asks for one, which the group's pages hear)."""
        while (event := await self.next_event(timeout))["type"] == "operation" and event[
            "kind"
        ] == "ssh_sync":
            continue
        return event

    async def hears_nothing(self) -> bool:
        return await self.communicator.receive_nothing(timeout=QUIET)


@contextlib.asynccontextmanager
async def events_socket(user=None, *, origin: bytes = ORIGIN, path: str = "/ws/events/"):
    headers = [(b"origin", origin)]
    if user is not None:
        headers.append((b"cookie", f"sessionid={await session_of(user)}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    try:
        yield Page(communicator, connected)
    finally:
        await communicator.disconnect()


async def snapshot(vm, by) -> Operation:
    # A member's move asked the VM to update SSH access: done, as a worker would.
    await sync_to_async(Operation.objects.filter(vm=vm, kind=OperationKind.SSH_SYNC).update)(
        status=OperationStatus.SUCCEEDED
    )
    return await sync_to_async(requests.vm_operation_request)(
        vm=vm, kind=OperationKind.SNAPSHOT, by=by, params={"name": "s1"}
    )


async def claim(op: Operation) -> None:
    """A worker claims the operation: it is running."""
    await sync_to_async(runner.operation_claim)(operation_id=op.pk, worker="w/1")


# --- the group's members ------------------------------------------------------------------------


async def test_a_member_and_her_teammate_see_their_groups_operation_queued_then_running(
    cast, alice, bob
):
    async with events_socket(alice) as alices, events_socket(bob) as bobs:
        assert alices.connected and bobs.connected
        op = await snapshot(cast.vm_a, alice)
        for page in (alices, bobs):
            event = await page.next_event()
            assert (event["type"], event["operation"], event["status"]) == (
                "operation",
                op.pk,
                "queued",
            )
            assert (event["vm_name"], event["kind_display"]) == ("vm1", "Snapshot")
        await claim(op)
        for page in (alices, bobs):
            assert (await page.next_event())["status"] == "running"


async def test_a_member_of_another_group_hears_nothing_of_it_but_hears_her_own(cast, alice, carol):
    async with events_socket(carol) as carols:
        assert carols.connected
        await snapshot(cast.vm_a, alice)
        assert await carols.hears_nothing()
        op = await snapshot(cast.vm_b, carol)
        event = await carols.next_event()
        assert (event["group"], event["operation"]) == (cast.group_b.pk, op.pk)


async def test_a_student_in_no_group_hears_nothing(cast, alice, dave):
    async with events_socket(dave) as daves:
        assert daves.connected
        await snapshot(cast.vm_a, alice)
        assert await daves.hears_nothing()


async def test_anonymous_is_refused_before_the_socket_opens(cast):
    async with events_socket(None) as anonymous:
        assert not anonymous.connected


async def test_a_page_of_another_site_is_refused_even_with_a_session(cast, alice):
    async with events_socket(alice, origin=b"https://evil.example") as page:
        assert not page.connected


# --- course staff -------------------------------------------------------------------------------


async def test_the_instructor_hears_every_group_of_the_course(cast, alice, carol, ines):
    async with events_socket(ines) as ineses:
        assert ineses.connected
        op_a = await snapshot(cast.vm_a, alice)
        assert (await ineses.next_event())["operation"] == op_a.pk
        op_b = await snapshot(cast.vm_b, carol)
        assert (await ineses.next_event())["operation"] == op_b.pk


@database_sync_to_async
def instructor_of_another_course(make_student):
    other = Course.objects.create(slug="net201", title="Networks")
    return make_student("olga", role=Role.INSTRUCTOR, in_course=other)


async def test_an_instructor_of_another_course_hears_nothing(cast, alice, make_student):
    olga = await instructor_of_another_course(make_student)
    async with events_socket(olga) as olgas:
        assert olgas.connected
        await snapshot(cast.vm_a, alice)
        assert await olgas.hears_nothing()


# --- access changes -----------------------------------------------------------------------------


@database_sync_to_async
def move(user, *, to: Group | None, by) -> None:
    """Course staff put the student into a group, or out of it (the cast has one course)."""
    membership_group_set(membership=Membership.objects.get(user=user), group=to, by=by)


async def test_a_member_taken_out_of_the_group_stops_hearing_it_at_once(cast, alice, bob, ines):
    async with events_socket(bob) as bobs:
        assert bobs.connected
        await move(bob, to=None, by=ines)
        assert await bobs.next_event_but_ssh_updates() == {
            "type": "access"
        }  # the page refreshes: a 404
        assert await bobs.hears_nothing()  # the group's own change was not for him any more
        await snapshot(cast.vm_a, alice)
        assert await bobs.hears_nothing()


async def test_a_student_put_into_a_group_starts_hearing_it(cast, alice, dave, ines):
    async with events_socket(dave) as daves:
        assert daves.connected
        await move(dave, to=cast.group_a, by=ines)
        # Refresh the page (which shows the group now); from here on, its events.
        assert await daves.next_event_but_ssh_updates() == {"type": "access"}
        op = await snapshot(cast.vm_a, alice)
        assert (await daves.next_event())["operation"] == op.pk


# --- the browser has nothing to say ----------------------------------------------------------


async def test_a_client_frame_over_a_few_bytes_closes_the_socket(cast, alice):
    async with events_socket(alice) as page:
        await page.communicator.send_to(text_data="ping")  # small: ignored
        op = await snapshot(cast.vm_a, alice)
        assert (await page.next_event())["operation"] == op.pk
        await page.communicator.send_to(text_data="x" * 1000)
        closed = await page.communicator.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 1009}


async def test_events_name_no_channel_group_a_browser_could_use(cast, alice):
    """The wire carries the payload only: no channel names, message types or user ids."""
    async with events_socket(alice) as page:
        await snapshot(cast.vm_a, alice)
        raw = await page.communicator.receive_from(timeout=5)
        assert "events." not in raw
        assert set(json.loads(raw)) == {
            "type", "group", "course", "group_name", "vm", "vm_name", "operation", "kind",
            "kind_display", "status", "status_display", "progress", "error",
        }  # fmt: skip


# --- the pushed regions ---------------------------------------------------------------------


async def next_push(page: Page, timeout: float = 5) -> dict:
    while (frame := await page.next_frame(timeout))["type"] != "regions":
        continue
    return frame


async def test_each_change_pushes_the_members_rendering_to_the_group_and_never_the_staffs(
    cast, alice, ines
):
    async with events_socket(alice) as alices, events_socket(ines) as instructors:
        op = await snapshot(cast.vm_a, alice)
        first = await next_push(alices)
        await claim(op)
        second = await next_push(alices)
        assert [(p["page"], p["audience"], p["group"]) for p in (first, second)] == [
            ("group", "members", cast.group_a.pk)
        ] * 2
        assert "queued" in first["regions"]["machines"]
        assert "running" in second["regions"]["machines"]
        assert second["at"] > first["at"]
        staff = [await next_push(instructors) for _ in range(2)]
        assert {(p["page"], p["audience"]) for p in staff} == {("course", "staff")}
        assert all(p["audience"] == "members" for p in alices.pushes)


async def test_the_staff_rendering_reaches_a_staff_members_group_page_and_no_students(
    cast, alice, carol, ines
):
    page = f"/ws/events/?group={cast.group_a.pk}"
    async with (
        events_socket(ines, path=page) as instructors,
        events_socket(alice, path=page) as alices,
        events_socket(carol, path=page) as carols,  # another group's student, same query
    ):
        await snapshot(cast.vm_a, alice)
        pushed = [await next_push(instructors) for _ in range(2)]
        assert {(p["page"], p["audience"]) for p in pushed} == {
            ("group", "staff"),
            ("course", "staff"),
        }
        staff_group = next(p for p in pushed if p["page"] == "group")
        assert "?mode=view" in staff_group["regions"]["machines"]
        mine = await next_push(alices)
        assert mine["audience"] == "members" and "?mode=view" not in mine["regions"]["machines"]
        assert await carols.hears_nothing()
