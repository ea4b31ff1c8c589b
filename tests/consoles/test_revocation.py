"""Access ends, sockets close (or follow): every way it ends × every socket that outlives it.

The ways access ends (``labs.people.revocation``): a membership deleted, a role changed in
the admin or by a roster import, the account deactivated, the password changed (from
another browser) or reset, the browser signed out. The sockets: a console through the
Channels transport (``portal.asgi``, WebsocketCommunicator), a console through the
websockify proxy (``manage.py console_proxy`` as its own process, re-checking only every
60 s so that only the revocation can close it in time), and ``/ws/events/``.

Each socket is open and working before the change; within a second after it, a console is
closed with ``CloseCode.REVOKED`` and an events socket is either closed the same way (the
account or session is no longer signed in) or told to refresh and re-subscribed where the
user may still listen (access to a group or course ended, the account goes on).
"""

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.forms import SetPasswordForm
from django.test import Client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from labs.choices import GroupStatus, ObservedState, Role
from labs.consoles import tickets
from labs.consoles.rules import CloseCode
from labs.live import events
from labs.models import ConsoleSession, Group, Host, Image, Membership, Vm
from labs.people.roster import roster_import
from portal.asgi import application
from tests.conftest import child_db_env

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

BASE_DIR = Path(__file__).resolve().parents[2]
ORIGIN = "http://127.0.0.1:8000"
PASSWORD = "Old-passw0rd-for-tests"
# The proxy process and this module's tests share one channel layer (and lease) prefix.
PREFIX = f"stratus-test-revoke-{uuid.uuid4().hex}"
PROMPT = 1.0  # seconds: "within a second"


@pytest.fixture(autouse=True)
def _shared_prefix(settings):
    layers = {**settings.CHANNEL_LAYERS}
    layers["default"] = {**layers["default"], "CONFIG": {**layers["default"]["CONFIG"]}}
    layers["default"]["CONFIG"]["prefix"] = PREFIX
    settings.CHANNEL_LAYERS = layers
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match=f"{PREFIX}:sockets:*"):
        client.delete(key)  # leases of an earlier test's users (ids are reused)
    client.close()


# --- the proxy process and the VNC server --------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy(django_db_setup, tmp_path_factory):
    """`manage.py console_proxy --host h1`, re-checking only every 60 s; stopped by PID."""
    port = _free_port()
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    env = {
        **os.environ,
        **child_db_env(),
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "SITE_URL": ORIGIN,
        "CHANNEL_LAYER_PREFIX": PREFIX,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "console_proxy", "--listen", f"127.0.0.1:{port}"]
            + ["--host", "h1", "--recheck", "60"],
            cwd=BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while b"proxying from" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"console_proxy did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield {"port": port, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


VERSION = b"RFB 003.008\n"
# An RFB 3.8 server with security None and a 4x4 desktop named "fake" (the VM's
# recorded name), as the consoles require, before it echoes.
GREETING = VERSION + b"\x01\x01" + bytes(4) + struct.pack(">HH16xI", 4, 4, 4) + b"fake"


async def _echo(reader, writer):
    with contextlib.suppress(ConnectionError):
        writer.write(GREETING)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest_asyncio.fixture
async def vnc_port():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    server.close_clients()


@dataclass
class Cast:
    alice: object
    bob: object
    ines: object
    vm_a: Vm
    group_a: Group


@pytest.fixture
def cast(course, group_a, alice, bob, ines, vnc_port) -> Cast:
    Group.objects.filter(pk=group_a.pk).update(status=GroupStatus.APPROVED)
    host = Host.objects.create(
        name="h1", uri="qemu:///system", vcpus=8, memory_mib=8192, disk_gib=99
    )
    image = Image.objects.create(name="deb", os="Debian 12", path="/srv/base.qcow2")
    vm = Vm.objects.create(
        group=group_a,
        name="vm1",
        host=host,
        image=image,
        vcpus=1,
        memory_mib=1024,
        disk_gib=10,
        observed_state=ObservedState.RUNNING,
        vnc_host="127.0.0.1",
        vnc_port=vnc_port,
        vnc_name="fake",
    )
    for user in (alice, bob, ines):
        user.set_password(PASSWORD)
        user.save()
    return Cast(alice, bob, ines, vm, group_a)


# --- the browser: a signed-in session and its sockets ----------------------------------------


@database_sync_to_async
def signed_in(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def session_key_of(client: Client) -> str:
    return client.cookies[settings.SESSION_COOKIE_NAME].value


class Socket:
    """What the page holds open; ``ended`` waits for the server's verdict."""

    async def working(self) -> None: ...

    async def ended(self, timeout: float) -> tuple[str, object]:
        """("closed", code) or ("refreshed", None)."""
        raise NotImplementedError

    async def close(self) -> None: ...


class ChannelsConsole(Socket):
    def __init__(self, communicator):
        self.communicator = communicator
        self.greeted = False

    @classmethod
    async def open(cls, cast, user, client) -> "ChannelsConsole":
        key = session_key_of(client)
        token = await sync_to_async(tickets.ticket_issue)(
            user=user, vm=cast.vm_a, session_key=key, view_only=False
        )
        communicator = WebsocketCommunicator(
            application,
            f"/ws/vms/{cast.vm_a.pk}/console/",
            headers=[(b"origin", ORIGIN.encode()), (b"cookie", f"sessionid={key}".encode())],
            subprotocols=[tickets.SUBPROTOCOL_PREFIX + token],
        )
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        return cls(communicator)

    async def working(self) -> None:
        said = b"ping" if self.greeted else VERSION
        expected = said if self.greeted else GREETING + VERSION
        self.greeted = True
        await self.communicator.send_to(bytes_data=said)
        received = b""
        while len(received) < len(expected):
            received += (await self.communicator.receive_output(5))["bytes"]
        assert received == expected

    async def ended(self, timeout):
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "websocket.close", message
        return "closed", message["code"]

    async def close(self):
        await self.communicator.disconnect(timeout=3)


class ProxyConsole(Socket):
    def __init__(self, ws):
        self.ws = ws
        self.greeted = False

    @classmethod
    async def open(cls, cast, user, client, proxy) -> "ProxyConsole":
        key = session_key_of(client)
        token = await sync_to_async(tickets.ticket_issue)(
            user=user, vm=cast.vm_a, session_key=key, view_only=False
        )
        ws = await connect(
            f"ws://127.0.0.1:{proxy['port']}/ws/vms/{cast.vm_a.pk}/console/",
            subprotocols=[tickets.SUBPROTOCOL_PREFIX + token],
            additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={key}"},
            origin=ORIGIN,
            proxy=None,
            compression=None,
            open_timeout=10,
            close_timeout=5,
        )
        return cls(ws)

    async def working(self) -> None:
        said = b"ping" if self.greeted else VERSION
        expected = said if self.greeted else GREETING + VERSION
        self.greeted = True
        await self.ws.send(said)
        received = b""
        while len(received) < len(expected):
            received += await asyncio.wait_for(self.ws.recv(), 5)
        assert received == expected

    async def ended(self, timeout):
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as closed:
            return "closed", closed.rcvd.code if closed.rcvd else None

    async def close(self):
        await self.ws.close()


class EventsSocket(Socket):
    def __init__(self, communicator):
        self.communicator = communicator
        self.greeted = False

    @classmethod
    async def open(cls, cast, user, client) -> "EventsSocket":
        key = session_key_of(client)
        communicator = WebsocketCommunicator(
            application,
            "/ws/events/",
            headers=[(b"origin", ORIGIN.encode()), (b"cookie", f"sessionid={key}".encode())],
        )
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        return cls(communicator)

    async def working(self) -> None:
        assert await self.communicator.receive_nothing(0.1)

    async def ended(self, timeout):
        while True:
            message = await self.communicator.receive_output(timeout)
            if message["type"] == "websocket.close":
                return "closed", message["code"]
            event = json.loads(message["text"])
            if event.get("type") in ("operation", "regions"):
                # The group's VMs being asked to update SSH access, as access ends: an
                # event (and its page's pushed regions) the member may still see (they
                # were a member when it was sent).
                continue
            assert event == {"type": "access"}, message
            return "refreshed", None

    async def close(self):
        await self.communicator.disconnect(timeout=3)


# --- the ways access ends ------------------------------------------------------------------


def _delete_membership(cast, user, client):
    Membership.objects.get(user=user).delete()


def _role_in_admin(cast, user, client):
    membership = Membership.objects.get(user=user)
    membership.role = Role.STUDENT  # what the admin's change form saves
    membership.save()


def _role_by_roster(cast, user, client):
    report = roster_import(
        course=cast.group_a.course,
        data=f"username,email,role\n{user.username},{user.email},student\n".encode(),
    )
    assert any("role" in change for line in report.lines for change in line.changes)


def _deactivate(cast, user, client):
    user.is_active = False
    user.save()


def _password_changed_elsewhere(cast, user, client):
    other = Client()
    assert other.login(username=user.username, password=PASSWORD)
    response = other.post(
        "/accounts/password_change/",
        {
            "old_password": PASSWORD,
            "new_password1": "A-new-passw0rd-42",
            "new_password2": "A-new-passw0rd-42",
        },
    )
    assert response.status_code == 302, response.content[:500]


def _password_reset(cast, user, client):
    form = SetPasswordForm(
        user, {"new_password1": "A-reset-passw0rd-42", "new_password2": "A-reset-passw0rd-42"}
    )
    assert form.is_valid(), form.errors
    form.save()  # what the reset link's page does


def _sign_out(cast, user, client):
    assert client.post("/accounts/logout/").status_code in (200, 302)


# (who, the change, what the events socket does: "closed" or "refreshed")
WAYS = {
    "a membership is deleted": ("bob", _delete_membership, "refreshed"),
    "a role changes in the admin": ("ines", _role_in_admin, "refreshed"),
    "a role changes in a roster import": ("ines", _role_by_roster, "refreshed"),
    "the account is deactivated": ("alice", _deactivate, "closed"),
    "the password is changed from another browser": (
        "alice",
        _password_changed_elsewhere,
        "closed",
    ),
    "the password is reset": ("alice", _password_reset, "closed"),
    "the browser signs out": ("alice", _sign_out, "closed"),
}
SOCKETS = ["console (Channels)", "console (websockify)", "events"]


async def _open(kind, cast, user, client, request) -> Socket:
    if kind == "console (Channels)":
        return await ChannelsConsole.open(cast, user, client)
    if kind == "console (websockify)":
        return await ProxyConsole.open(cast, user, client, request.getfixturevalue("proxy"))
    return await EventsSocket.open(cast, user, client)


@pytest.mark.parametrize("socket_kind", SOCKETS)
@pytest.mark.parametrize("way", list(WAYS))
async def test_a_socket_ends_within_a_second_of_its_access(cast, request, way, socket_kind):
    who, change, events_outcome = WAYS[way]
    user = getattr(cast, who)
    client = await signed_in(user)
    page = await _open(socket_kind, cast, user, client, request)
    try:
        await page.working()
        await database_sync_to_async(change)(cast, user, client)
        started = time.monotonic()
        outcome = await page.ended(timeout=3)
        elapsed = time.monotonic() - started
        if socket_kind == "events" and events_outcome == "refreshed":
            assert outcome == ("refreshed", None)
            # Re-subscribed: what the group and the course publish no longer reaches it.
            payload = {"type": "vm", "group": cast.group_a.pk, "course": cast.group_a.course_id}
            message = {"type": events.EVENT_MESSAGE, "payload": payload}
            await sync_to_async(events.layer_publish)(
                [
                    (events.group_channel(cast.group_a.pk), message),
                    (events.course_channel(cast.group_a.course_id), message),
                ]
            )
            assert await page.communicator.receive_nothing(0.5)
        else:
            assert outcome == ("closed", CloseCode.REVOKED)
        assert elapsed < PROMPT, f"took {elapsed:.2f} s"
    finally:
        await page.close()
    if socket_kind.startswith("console"):
        await _audit_row_closed(user)


async def _audit_row_closed(user) -> None:
    @database_sync_to_async
    def reasons():
        return list(
            ConsoleSession.objects.filter(user=user).values_list("close_reason", flat=True)
        )

    deadline = time.monotonic() + 5
    while not (found := await reasons()) or not all(r.startswith("revoked") for r in found):
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_signing_out_one_browser_leaves_the_other_browsers_console_open(cast, request):
    first, second = await signed_in(cast.alice), await signed_in(cast.alice)
    leaving = await ProxyConsole.open(cast, cast.alice, first, request.getfixturevalue("proxy"))
    staying = await ChannelsConsole.open(cast, cast.alice, second)
    try:
        await leaving.working()
        await staying.working()
        await database_sync_to_async(_sign_out)(cast, cast.alice, first)
        assert await leaving.ended(timeout=PROMPT) == ("closed", CloseCode.REVOKED)
        assert await staying.communicator.receive_nothing(0.5)
        await staying.working()
    finally:
        await leaving.close()
        await staying.close()
