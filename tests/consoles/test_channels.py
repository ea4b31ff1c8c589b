"""The console proxy (/ws/vms/<id>/console/) against the real ASGI application.

Every connection goes through portal.asgi: the Origin validator, the session and auth
middleware, the router and the consumer, with real tickets in the real Redis and a small
fake VNC server on 127.0.0.1 standing in for QEMU.
"""

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.test import Client

from labs.choices import DesiredState, GroupStatus, ObservedState, OperationKind, OperationStatus
from labs.consoles import tickets as consoles
from labs.models import ConsoleSession, Group, Host, Membership, Operation, Vm
from portal.asgi import application

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

ORIGIN = b"http://127.0.0.1:8000"
REFUSAL = {"type": "websocket.close"}  # every refusal, whatever the reason
VERSION = b"RFB 003.008\n"
PIXEL_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
SERVER_INIT = struct.pack(">HH", 4, 4) + PIXEL_FORMAT + struct.pack(">I", 4) + b"fake"


# -- a fake VNC server ---------------------------------------------------------------------


class FakeConnection:
    def __init__(self, writer: asyncio.StreamWriter, keep: bool) -> None:
        self.writer = writer
        self.keep = keep
        self.received = bytearray()
        self.count = 0
        self.sha256 = hashlib.sha256()
        self.closed = asyncio.Event()

    def take(self, data: bytes) -> None:
        self.count += len(data)
        self.sha256.update(data)
        if self.keep:
            self.received += data


class FakeVnc:
    """A loopback VNC server that records what its clients send.

    RFB mode: RFB 3.8, security type None, a 4x4 framebuffer named "fake", then it
    only listens. Raw mode (``source`` given): no RFB; it sends ``source`` and hashes
    what it receives.
    """

    def __init__(self, source: bytes | None = None, *, stalled: bool = False) -> None:
        self.source = source
        self.stalled = stalled  # sends its version, then never reads: a hung VM
        self.connections: list[FakeConnection] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, unix_path: str | None = None) -> "FakeVnc":
        if unix_path:
            self.server = await asyncio.start_unix_server(self._serve, unix_path)
        else:
            listener = socket.socket()
            if self.stalled:  # small buffers, so the proxy's writes back up soon
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            listener.bind(("127.0.0.1", 0))
            self.server = await asyncio.start_server(self._serve, sock=listener)
            self.port = listener.getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        self.server.close_clients()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader, writer) -> None:
        conn = FakeConnection(writer, keep=self.source is None)
        self.connections.append(conn)
        sender = None
        try:
            if self.stalled:
                writer.write(VERSION)
                await asyncio.Event().wait()
            if self.source is not None:
                sender = asyncio.create_task(self._send_source(writer))
            else:
                writer.write(VERSION)
                conn.take(await reader.readexactly(12))
                writer.write(b"\x01\x01")  # one security type: None
                conn.take(await reader.readexactly(1))
                writer.write(b"\x00\x00\x00\x00")  # SecurityResult: OK
                conn.take(await reader.readexactly(1))  # ClientInit
                writer.write(SERVER_INIT)
            while data := await reader.read(65536):
                conn.take(data)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.closed.set()
            if sender is not None:
                sender.cancel()
            writer.close()

    async def _send_source(self, writer) -> None:
        view = memoryview(self.source)
        for start in range(0, len(view), 65536):
            writer.write(view[start : start + 65536])
            await writer.drain()


@pytest_asyncio.fixture
async def fake_vnc():
    """Start fake VNC servers (``await fake_vnc()``); all stopped after the test."""
    servers = []

    async def start(**options) -> FakeVnc:
        server = await FakeVnc(**options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


# -- the cast, their VMs and their browsers ------------------------------------------------


@dataclass
class Cast:
    alice: object
    bob: object
    carol: object
    dave: object
    ines: object
    vm_a: Vm
    vm_a2: Vm
    vm_b: Vm


@pytest.fixture
def cast(course, group_a, group_b, alice, bob, carol, dave, ines, make_vm) -> Cast:
    return Cast(
        alice, bob, carol, dave, ines,
        make_vm(group_a, name="vm1", ssh_port=22000),
        make_vm(group_a, name="vm2", ssh_port=22001),
        make_vm(group_b, name="vm1", ssh_port=22002),
    )  # fmt: skip


@pytest_asyncio.fixture
async def vnc(cast, fake_vnc) -> FakeVnc:
    """An RFB fake server that every VM of the cast points at."""
    server = await fake_vnc()
    await update_vms(Vm.objects.all(), vnc_host="127.0.0.1", vnc_port=server.port)
    return server


@database_sync_to_async
def update_vms(queryset, **fields) -> None:
    queryset.update(**fields)


@database_sync_to_async
def login(user) -> str:
    """A real browser session for the user; returns its session key (the cookie)."""
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def ticket(user, vm, session_key: str, *, view_only: bool = False) -> str:
    return await sync_to_async(consoles.ticket_issue)(
        user=user, vm=vm, session_key=session_key, view_only=view_only
    )


@database_sync_to_async
def console_sessions() -> list[ConsoleSession]:
    return list(ConsoleSession.objects.order_by("pk"))


class Browser:
    """One websocket as noVNC would open it, seen through WebsocketCommunicator."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.answer: dict = {}
        self.buffer = bytearray()

    @property
    def accepted(self) -> bool:
        return self.answer.get("type") == "websocket.accept"

    async def send(self, data: bytes) -> None:
        await self.communicator.send_to(bytes_data=data)

    async def read(self, size: int, timeout: float = 5) -> bytes:
        """Exactly ``size`` bytes of the VNC server's stream."""
        deadline = time.monotonic() + timeout
        while len(self.buffer) < size:
            message = await self.communicator.receive_output(deadline - time.monotonic())
            assert message["type"] == "websocket.send", message
            self.buffer += message["bytes"]
        data, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        return data

    async def closed(self, timeout: float = 5) -> dict:
        """Wait for the server's close, skipping screen bytes still in flight."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.communicator.receive_output(deadline - time.monotonic())
            if message["type"] == "websocket.close":
                return message
            assert message["type"] == "websocket.send", message


@contextlib.asynccontextmanager
async def browser(
    vm_id: int,
    *,
    session_key: str | None = None,
    token: str | None = None,
    origin: bytes | None = ORIGIN,
    subprotocols: list[str] | None = None,
):
    headers = []
    if origin is not None:
        headers.append((b"origin", origin))
    if session_key is not None:
        headers.append((b"cookie", f"sessionid={session_key}".encode()))
    if subprotocols is None:
        subprotocols = [consoles.SUBPROTOCOL_PREFIX + token] if token else []
    communicator = WebsocketCommunicator(
        application, f"/ws/vms/{vm_id}/console/", headers=headers, subprotocols=subprotocols
    )
    page = Browser(communicator)
    try:
        await communicator.send_input({"type": "websocket.connect"})
        page.answer = await communicator.receive_output(timeout=5)
        yield page
    finally:
        await communicator.disconnect(timeout=3)


@contextlib.asynccontextmanager
async def console_of(user, vm, *, view_only: bool = False):
    """The user's console of the VM, as the page opens it: login, ticket, websocket."""
    session_key = await login(user)
    token = await ticket(user, vm, session_key, view_only=view_only)
    async with browser(vm.pk, session_key=session_key, token=token) as page:
        page.token = token
        yield page


async def eventually(predicate, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- the cast ------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
async def test_members_and_the_instructor_get_the_vms_screen(cast, vnc, who):
    user = getattr(cast, who)
    async with console_of(user, cast.vm_a) as page:
        assert page.accepted
        assert page.answer["subprotocol"] == consoles.SUBPROTOCOL_PREFIX + page.token
        assert await page.read(12) == VERSION
    assert len(vnc.connections) == 1


async def test_the_instructor_can_watch_view_only(cast, vnc):
    async with console_of(cast.ines, cast.vm_a, view_only=True) as page:
        assert page.accepted
        assert await page.read(12) == VERSION
    [session] = await console_sessions()
    assert session.view_only


async def test_anonymous_is_refused(cast, vnc):
    token = await ticket(cast.alice, cast.vm_a, await login(cast.alice))
    async with browser(cast.vm_a.pk, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_another_groups_member_cannot_use_a_ticket_of_their_own_vm(cast, vnc):
    session_key = await login(cast.carol)
    token = await ticket(cast.carol, cast.vm_b, session_key)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


@pytest.mark.parametrize("who", ["carol", "dave"])
async def test_a_ticket_for_someone_outside_the_group_is_refused_by_the_proxy(cast, vnc, who):
    # The ticket view would never issue these; the proxy checks membership again anyway.
    async with console_of(getattr(cast, who), cast.vm_a) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_a_student_never_gets_a_view_only_console(cast, vnc):
    async with console_of(cast.alice, cast.vm_a, view_only=True) as page:
        assert page.answer == REFUSAL


# -- refused connections -------------------------------------------------------------------


async def test_a_ticket_works_once(cast, vnc):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.accepted
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    assert len(vnc.connections) == 1


async def test_an_expired_ticket_is_refused(cast, vnc, settings):
    settings.CONSOLE_TICKET_TTL = 1
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    await asyncio.sleep(1.5)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL


async def test_a_ticket_for_another_vm_is_refused_and_burnt(cast, vnc):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a2, session_key)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    # The failed attempt used the ticket up: it does not work on its own VM either.
    async with browser(cast.vm_a2.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_another_users_ticket_is_refused(cast, vnc):
    session_key = await login(cast.alice)
    # Even bound to alice's own browser session, a ticket for bob is not hers.
    bobs_token = await ticket(cast.bob, cast.vm_a, session_key)
    async with browser(cast.vm_a.pk, session_key=session_key, token=bobs_token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_a_ticket_from_another_browser_session_is_refused(cast, vnc):
    token = await ticket(cast.alice, cast.vm_a, await login(cast.alice))
    other_session = await login(cast.alice)  # the same user, another browser
    async with browser(cast.vm_a.pk, session_key=other_session, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_a_logged_out_session_is_refused(cast, vnc):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    await database_sync_to_async(Session.objects.filter(session_key=session_key).delete)()
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL


@pytest.mark.parametrize("origin", [b"http://evil.example", b"null", None])
async def test_a_foreign_or_missing_origin_is_refused(cast, vnc, origin):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token, origin=origin) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


@pytest.mark.parametrize(
    "subprotocols",
    [
        [],
        ["binary"],
        ["stratus.ticket."],
        ["stratus.ticket.not a token!"],
        ["stratus.ticket.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"],  # well formed, unknown
    ],
)
async def test_a_missing_or_bad_ticket_subprotocol_is_refused(cast, vnc, subprotocols):
    session_key = await login(cast.alice)
    async with browser(cast.vm_a.pk, session_key=session_key, subprotocols=subprotocols) as page:
        assert page.answer == REFUSAL


async def test_two_tickets_in_one_handshake_are_refused(cast, vnc):
    session_key = await login(cast.alice)
    tokens = [await ticket(cast.alice, cast.vm_a, session_key) for _ in range(2)]
    offered = [consoles.SUBPROTOCOL_PREFIX + t for t in tokens]
    async with browser(cast.vm_a.pk, session_key=session_key, subprotocols=offered) as page:
        assert page.answer == REFUSAL


@pytest.mark.parametrize(
    "change",
    [
        {"observed_state": ObservedState.SHUTOFF},
        {"observed_state": ObservedState.UNKNOWN},
        {"desired_state": DesiredState.DELETED},
        {"vnc_host": "", "vnc_port": None},
        {"vnc_host": "192.0.2.10"},  # never a VNC port across the network
        {"vnc_socket": "relative/path.sock"},
    ],
)
async def test_a_vm_without_a_usable_running_console_is_refused(cast, vnc, change):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    await update_vms(Vm.objects.filter(pk=cast.vm_a.pk), **change)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_an_unreachable_vnc_server_is_refused(cast, vnc):
    await vnc.stop()
    async with console_of(cast.alice, cast.vm_a) as page:
        assert page.answer == REFUSAL
    assert await console_sessions() == []


async def test_a_member_removed_after_the_ticket_was_issued_is_refused(cast, vnc):
    session_key = await login(cast.bob)
    token = await ticket(cast.bob, cast.vm_a, session_key)
    await update_vms(Membership.objects.filter(user=cast.bob), group=None)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL
    assert vnc.connections == []


async def test_a_group_rejected_after_the_ticket_was_issued_is_refused(cast, vnc):
    session_key = await login(cast.alice)
    token = await ticket(cast.alice, cast.vm_a, session_key)
    await update_vms(Group.objects.filter(name="Alpha"), status=GroupStatus.REJECTED)
    async with browser(cast.vm_a.pk, session_key=session_key, token=token) as page:
        assert page.answer == REFUSAL


async def test_tokens_never_reach_the_logs(cast, vnc, caplog):
    caplog.set_level(logging.DEBUG)
    refused_token = await ticket(cast.alice, cast.vm_a, await login(cast.alice))
    async with browser(cast.vm_a.pk, session_key=await login(cast.alice), token=refused_token):
        pass
    async with console_of(cast.alice, cast.vm_a) as page:
        assert page.accepted
        accepted_token = page.token
    assert "console refused: ticket is from another browser session" in caplog.text
    assert "opened" in caplog.text and "closed: browser closed" in caplog.text
    for token in (refused_token, accepted_token):
        assert token not in caplog.text
        assert not any(token in str(record.args) for record in caplog.records)


# -- the byte pump -------------------------------------------------------------------------


async def test_50_mb_each_way_arrive_intact(cast, fake_vnc):
    size = 50 * 1024 * 1024
    rng = random.Random(1)
    # Both streams open as RFB does (the proxy checks the server's desktop name), then
    # carry random bytes.
    greeting = VERSION + b"\x01\x01" + bytes(4) + SERVER_INIT
    to_browser = greeting + rng.randbytes(size - len(greeting))
    to_vm = VERSION + rng.randbytes(size - len(VERSION))
    server = await fake_vnc(source=to_browser)
    await update_vms(
        Vm.objects.filter(pk=cast.vm_a.pk), vnc_host="127.0.0.1", vnc_port=server.port
    )
    async with console_of(cast.alice, cast.vm_a) as page:
        assert page.accepted

        async def upload():
            view = memoryview(to_vm)
            for start in range(0, size, 65536):
                await page.send(bytes(view[start : start + 65536]))

        async def download():
            received = hashlib.sha256()
            count = 0
            while count < size:
                message = await page.communicator.receive_output(timeout=30)
                received.update(message["bytes"])
                count += len(message["bytes"])
            return count, received.hexdigest()

        _, (count, digest) = await asyncio.gather(upload(), download())
        assert (count, digest) == (size, hashlib.sha256(to_browser).hexdigest())
        [conn] = server.connections
        await eventually(lambda: conn.count >= size, timeout=30)
        assert conn.count == size
        assert conn.sha256.hexdigest() == hashlib.sha256(to_vm).hexdigest()
    [session] = await console_sessions()
    assert (session.bytes_to_vm, session.bytes_from_vm) == (size, size)


async def test_a_unix_socket_endpoint_works(cast, tmp_path):
    server = await FakeVnc().start(unix_path=str(tmp_path / "vnc.sock"))
    try:
        await update_vms(Vm.objects.filter(pk=cast.vm_a.pk), vnc_socket=str(tmp_path / "vnc.sock"))
        async with console_of(cast.alice, cast.vm_a) as page:
            assert await page.read(12) == VERSION
    finally:
        await server.stop()


async def test_the_session_is_recorded_with_its_bytes_and_close_reason(cast, vnc):
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        for frame in (VERSION, b"\x01", b"\x01"):
            await page.send(frame)
        assert await page.read(2 + 4 + len(SERVER_INIT)) == b"\x01\x01" + bytes(4) + SERVER_INIT
        await eventually(lambda: len(vnc.connections[0].received) == 14)
        [live] = await console_sessions()
        assert (live.user_id, live.vm_id, live.view_only, live.ended_at) == (
            cast.alice.pk,
            cast.vm_a.pk,
            False,
            None,
        )
    [session] = await console_sessions()
    assert session.ended_at is not None
    assert session.bytes_to_vm == 14
    assert session.bytes_from_vm == 12 + 2 + 4 + len(SERVER_INIT)
    assert session.close_reason == "browser closed"
    await eventually(lambda: vnc.connections[0].closed.is_set())


async def test_the_vnc_server_closing_closes_the_console(cast, vnc):
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        vnc.connections[0].writer.close()
        assert (await page.closed())["code"] == 1000
    [session] = await console_sessions()
    assert session.close_reason == "VNC closed"


@database_sync_to_async
def _moving(vm, *, status, live=True, recorded=False) -> str:
    far = Host.objects.create(
        name="far", uri="qemu+tcp://127.0.0.2/system", vcpus=8, memory_mib=16384, disk_gib=200
    )
    params = {"host": far.pk, "from": vm.host_id, "ssh_port": 23000, "live": live}
    Operation.objects.create(vm=vm, kind=OperationKind.MOVE, status=status, params=params)
    if recorded:  # the worker has switched the row already
        Vm.objects.filter(pk=vm.pk).update(host=far)
    return far.name


@pytest.mark.parametrize(
    "status, recorded", [(OperationStatus.RUNNING, False), (OperationStatus.SUCCEEDED, True)]
)
async def test_a_console_whose_vm_moved_live_is_told_where_to(cast, vnc, status, recorded):
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        far = await _moving(cast.vm_a, status=status, recorded=recorded)
        vnc.connections[0].writer.close()  # the source's QEMU ends at the switch
        message = await page.closed()
        assert (message["code"], message["reason"]) == (4004, f"moved to {far}")
    [session] = await console_sessions()
    assert session.close_reason == f"moved to {far}"


@pytest.mark.parametrize(
    "status, live", [(OperationStatus.QUEUED, True), (OperationStatus.RUNNING, False)]
)
async def test_a_vnc_server_that_ends_without_a_live_move_is_just_closed(cast, vnc, status, live):
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        await _moving(cast.vm_a, status=status, live=live)
        vnc.connections[0].writer.close()
        message = await page.closed()
        assert message["code"] == 1000 and not message.get("reason")


async def test_text_frames_close_the_console(cast, vnc):
    async with console_of(cast.alice, cast.vm_a) as page:
        await page.communicator.send_to(text_data="RFB 003.008\n")
        assert (await page.closed())["code"] == 1003
    assert vnc.connections[0].received == b""


async def test_frames_over_the_limit_close_the_console(cast, vnc, settings):
    settings.CONSOLE_MAX_FRAME = 1024
    async with console_of(cast.alice, cast.vm_a) as page:
        await page.send(VERSION + b"x" * (1024 - 12))  # exactly the limit: forwarded
        await eventually(lambda: len(vnc.connections[0].received) == 1024)
        await page.send(b"y" * 1025)
        assert (await page.closed())["code"] == 1009
    [session] = await console_sessions()
    assert session.close_reason == "frame too large"
    assert session.bytes_to_vm == 1024


async def test_an_idle_console_is_closed(cast, vnc, settings):
    settings.CONSOLE_IDLE_TIMEOUT = 1
    async with console_of(cast.alice, cast.vm_a) as page:
        assert page.accepted
        started = time.monotonic()
        assert (await page.closed(timeout=3))["code"] == 4002
        assert time.monotonic() - started >= 0.9
    [session] = await console_sessions()
    assert session.close_reason == "idle timeout"


async def test_a_busy_console_is_still_closed_at_the_session_limit(cast, vnc, settings):
    settings.CONSOLE_IDLE_TIMEOUT = 1
    settings.CONSOLE_MAX_SESSION = 2
    async with console_of(cast.alice, cast.vm_a) as page:
        started = time.monotonic()
        for _ in range(6):  # input every 0.25 s: never idle
            await page.send(b"k")
            await asyncio.sleep(0.25)
        message = await page.closed(timeout=3)
        assert message["code"] == 4003
        assert time.monotonic() - started >= 1.9
    [session] = await console_sessions()
    assert session.close_reason == "session limit"


# -- revocation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason", ["VM stopped", "reset", "deleted", "migrated", "group rejected"]
)
async def test_revocation_closes_the_vms_consoles_within_a_second(cast, vnc, reason):
    async with (
        console_of(cast.alice, cast.vm_a) as alice,
        console_of(cast.ines, cast.vm_a) as ines,
    ):
        assert await alice.read(12) == VERSION
        assert await ines.read(12) == VERSION
        started = time.monotonic()
        await sync_to_async(consoles.console_revoke)(vm_id=cast.vm_a.pk, reason=reason)
        for page in (alice, ines):
            message = await page.closed(timeout=1)
            assert (message["code"], message["reason"]) == (4001, reason)
        assert time.monotonic() - started < 1.0
        for conn in vnc.connections:
            await asyncio.wait_for(conn.closed.wait(), 1)
    sessions = await console_sessions()
    assert [s.close_reason for s in sessions] == [f"revoked: {reason}"] * 2


async def test_revocation_does_not_wait_behind_a_vm_that_stopped_reading(cast, fake_vnc):
    server = await fake_vnc(stalled=True)
    await update_vms(
        Vm.objects.filter(pk=cast.vm_a.pk), vnc_host="127.0.0.1", vnc_port=server.port
    )
    size = 32 * 1024 * 1024
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        frame = b"\x00" * 65536
        for _ in range(size // len(frame)):  # far more than the socket buffers hold
            await page.send(frame)
        await asyncio.sleep(0.3)  # the proxy is now stuck in drain() (backpressure)
        started = time.monotonic()
        await sync_to_async(consoles.console_revoke)(vm_id=cast.vm_a.pk, reason="VM stopped")
        assert (await page.closed(timeout=1))["code"] == 4001
        assert time.monotonic() - started < 1.0
    [session] = await console_sessions()
    assert session.close_reason == "revoked: VM stopped"
    assert session.bytes_to_vm < size  # it really was held back


async def test_revoking_another_vm_leaves_the_console_open(cast, vnc):
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        await sync_to_async(consoles.console_revoke)(vm_id=cast.vm_a2.pk, reason="VM stopped")
        assert await page.communicator.receive_nothing(0.5)
        await page.send(VERSION)
        await eventually(lambda: vnc.connections[0].received == VERSION)


async def test_removing_a_member_closes_only_their_console(cast, vnc):
    async with console_of(cast.alice, cast.vm_a) as alice, console_of(cast.bob, cast.vm_a) as bob:
        assert await alice.read(12) == VERSION
        assert await bob.read(12) == VERSION
        started = time.monotonic()
        await sync_to_async(consoles.console_revoke)(
            vm_id=cast.vm_a.pk, reason="member removed", user_id=cast.alice.pk
        )
        assert (await alice.closed(timeout=1))["code"] == 4001
        assert time.monotonic() - started < 1.0
        assert await bob.communicator.receive_nothing(0.3)
        # Bob's console still works both ways.
        await bob.send(VERSION)
        await bob.send(b"\x01")
        assert await bob.read(2) == b"\x01\x01"  # the server answered bob's version
        await eventually(lambda: vnc.connections[1].received == VERSION + b"\x01")
        assert not vnc.connections[1].closed.is_set()
    sessions = await console_sessions()
    assert [s.close_reason for s in sessions] == ["revoked: member removed", "browser closed"]


# -- view-only -----------------------------------------------------------------------------


def key_event(keysym: int) -> bytes:
    return struct.pack(">BBxxI", 4, 1, keysym)


def pointer_event(x: int, y: int) -> bytes:
    return struct.pack(">BBHH", 5, 1, x, y)


def cut_text(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 6, len(text)) + text


SET_ENCODINGS = struct.pack(">BxHii", 2, 2, 0, -223)  # Raw, DesktopSize
UPDATE_REQUEST = struct.pack(">BBHHHH", 3, 0, 0, 0, 4, 4)


async def handshake(page: Browser, *, shared: bytes = b"\x01") -> None:
    """The client half of the RFB 3.8 handshake, in awkward pieces."""
    assert await page.read(12) == VERSION
    await page.send(VERSION[:5])
    await page.send(VERSION[5:])
    assert await page.read(2) == b"\x01\x01"
    await page.send(b"\x01")
    assert await page.read(4) == bytes(4)
    await page.send(shared)
    assert await page.read(len(SERVER_INIT)) == SERVER_INIT


QEMU_KEY = struct.pack(">BBHII", 255, 0, 1, 0x61, 30)


async def send_a_mixed_session(page: Browser) -> bytes:
    """Encodings, typing, a click, a paste and update requests, split across frames."""
    key, paste = key_event(0x72), cut_text(b"rm -rf ~\n")
    frames = [
        SET_ENCODINGS + key[:3],
        key[3:] + pointer_event(2, 3) + paste[:5],
        paste[5:] + UPDATE_REQUEST[:4],
        UPDATE_REQUEST[4:] + QEMU_KEY,
        UPDATE_REQUEST,
    ]
    for frame in frames:
        await page.send(frame)
    return b"".join(frames)


async def test_a_view_only_console_drops_input_but_keeps_the_picture_coming(cast, vnc):
    async with console_of(cast.ines, cast.vm_a, view_only=True) as page:
        await handshake(page, shared=b"\x00")  # asks for exclusive access: made shared
        await send_a_mixed_session(page)
        conn = vnc.connections[0]
        expected = VERSION + b"\x01" + b"\x01" + SET_ENCODINGS + UPDATE_REQUEST * 2
        await eventually(lambda: len(conn.received) >= len(expected))
        assert conn.received == expected
        # The server's updates still reach the viewer.
        conn.writer.write(b"\x00\x00\x00\x01" + b"update")
        assert await page.read(10) == b"\x00\x00\x00\x01update"
    [session] = await console_sessions()
    assert session.view_only and session.bytes_to_vm == len(expected)


async def test_a_driving_console_forwards_the_same_session_untouched(cast, vnc):
    # The counterpart of the view-only test: the fake server does record input.
    async with console_of(cast.ines, cast.vm_a) as page:
        await handshake(page, shared=b"\x00")
        sent = await send_a_mixed_session(page)
        conn = vnc.connections[0]
        expected = VERSION + b"\x01" + b"\x00" + sent  # the ClientInit as sent, too
        await eventually(lambda: len(conn.received) >= len(expected))
        assert conn.received == expected
        assert key_event(0x72) in conn.received and QEMU_KEY in conn.received


async def test_a_view_only_console_closes_on_something_that_is_not_rfb(cast, vnc):
    async with console_of(cast.ines, cast.vm_a, view_only=True) as page:
        await handshake(page)
        await page.send(b"\x07garbage")
        assert (await page.closed())["code"] == 1002
    [session] = await console_sessions()
    assert session.close_reason.startswith("protocol error")


# -- whose screen ----------------------------------------------------------------------------


async def test_a_server_announcing_another_vm_is_closed_before_its_screen(cast, vnc):
    """The endpoint the VM recorded answers with another VM's desktop (a freed port handed
    to the next VM that started): the console closes before that VM's ServerInit."""
    await update_vms(Vm.objects.filter(pk=cast.vm_a.pk), vnc_name="QEMU (someone else)")
    async with console_of(cast.alice, cast.vm_a) as page:
        assert await page.read(12) == VERSION
        for frame in (VERSION, b"\x01", b"\x01"):
            await page.send(frame)
        received = bytearray(page.buffer)
        while (message := await page.communicator.receive_output(5))["type"] != (
            "websocket.close"
        ):
            received += message["bytes"]
        assert message["code"] == 4001
        assert SERVER_INIT not in received and b"fake" not in received
    [session] = await console_sessions()
    assert session.close_reason == "not this VM's console"
