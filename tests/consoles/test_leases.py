"""Sockets per user (CONSOLE_MAX_PER_USER, EVENTS_MAX_PER_USER): refused before accept()
beyond the cap, freed when they close, and never held by a process that died."""

import asyncio
import contextlib
import time

import pytest
import pytest_asyncio
import redis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

from labs.consoles import leases, tickets
from labs.models import Vm
from portal.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = b"http://127.0.0.1:8000"


@pytest.fixture
def vm_a(group_a, make_vm, unused_tcp_port) -> Vm:
    return make_vm(group_a, vnc_host="127.0.0.1", vnc_port=unused_tcp_port)


@pytest_asyncio.fixture
async def vnc(vm_a):
    """A VNC server that accepts and stays quiet."""

    async def quiet(reader, writer):
        await reader.read()  # until the proxy hangs up
        writer.close()

    server = await asyncio.start_server(quiet, "127.0.0.1", vm_a.vnc_port, reuse_address=True)
    yield server
    server.close()


@database_sync_to_async
def login(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@contextlib.asynccontextmanager
async def console(user, vm, session_key):
    token = await sync_to_async(tickets.ticket_issue)(
        user=user, vm=vm, session_key=session_key, view_only=False
    )
    communicator = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/console/",
        headers=[(b"origin", ORIGIN), (b"cookie", f"sessionid={session_key}".encode())],
        subprotocols=[tickets.SUBPROTOCOL_PREFIX + token],
    )
    connected, _ = await communicator.connect(timeout=5)
    try:
        yield connected
    finally:
        await communicator.disconnect(timeout=3)


@contextlib.asynccontextmanager
async def events_socket(session_key):
    communicator = WebsocketCommunicator(
        application,
        "/ws/events/",
        headers=[(b"origin", ORIGIN), (b"cookie", f"sessionid={session_key}".encode())],
    )
    connected, _ = await communicator.connect(timeout=5)
    try:
        yield connected
    finally:
        await communicator.disconnect(timeout=3)


@pytest.mark.asyncio
async def test_a_user_gets_no_console_beyond_the_cap_until_one_closes(
    vm_a, vnc, alice, bob, settings
):
    settings.CONSOLE_MAX_PER_USER = 2
    key = await login(alice)
    async with console(alice, vm_a, key) as one, console(alice, vm_a, key) as two:
        assert one and two
        async with console(alice, vm_a, key) as three:
            assert not three  # refused before accept
        async with console(bob, vm_a, await login(bob)) as bobs:
            assert bobs  # the cap is per user
    async with console(alice, vm_a, key) as again:
        assert again


@pytest.mark.asyncio
async def test_a_user_gets_no_events_socket_beyond_the_cap(alice, settings):
    settings.EVENTS_MAX_PER_USER = 2
    key = await login(alice)
    async with events_socket(key) as one, events_socket(key) as two:
        assert one and two
        async with events_socket(key) as three:
            assert not three
    async with events_socket(key) as again:
        assert again


@pytest.mark.asyncio
async def test_the_leases_of_a_process_that_died_expire(vm_a, vnc, alice, settings):
    settings.CONSOLE_MAX_PER_USER = 1
    # A process that crashed with a console open: its lease was never dropped.
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    key = leases._key(leases.CONSOLE, alice.pk)
    client.zadd(key, {"crashed": time.time() + leases.LEASE_SECONDS})
    async with console(alice, vm_a, await login(alice)) as refused:
        assert not refused
    client.zadd(key, {"crashed": time.time() - 1})  # LEASE_SECONDS later
    async with console(alice, vm_a, await login(alice)) as opened:
        assert opened
    client.close()


def test_the_console_page_says_why_no_ticket_is_issued_at_the_cap(vm_a, alice, client, settings):
    settings.CONSOLE_MAX_PER_USER = 1
    redis_client = redis.Redis.from_url(django_settings.REDIS_URL)
    redis_client.zadd(  # a console alice has open elsewhere
        leases._key(leases.CONSOLE, alice.pk), {"elsewhere": time.time() + 30}
    )
    redis_client.close()
    client.force_login(alice)
    response = client.post(reverse("labs:vm_console_ticket", args=[vm_a.pk]))
    assert response.status_code == 429
    assert response.json() == {
        "error": "You have 1 consoles open, the most one person may have: close one first."
    }
