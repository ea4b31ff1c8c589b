"""The websockify console proxy (manage.py console_proxy) against a fake VNC echo server.

The proxy runs as its own process, as on a hypervisor, reading the test database; the
browser is the `websockets` client offering the ticket as its subprotocol.
"""

import copy
import hashlib
import json
import os
import secrets
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from labs.choices import GroupStatus, ObservedState
from labs.consoles import tickets as consoles
from labs.consoles.rules import CloseCode
from labs.consoles.tickets import ticket_consume
from labs.consoles.websockify import ticket_from_protocols
from labs.models import ConsoleSession, Group, Host, Image, Vm
from tests.conftest import child_db_env

BASE_DIR = Path(__file__).resolve().parents[2]
ORIGIN = settings.SITE_URL

pytestmark = pytest.mark.django_db(transaction=True)


# --- the cast's VMs behind fake VNC servers ------------------------------------------------


VERSION = b"RFB 003.008\n"
SERVER_INIT = struct.pack(">HHBBBBHHHBBB3xI", 4, 4, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 4)
SERVER_INIT += b"fake"  # the desktop name the VMs below record
# What an RFB 3.8 server with security None sends before the client's first message.
GREETING = VERSION + b"\x01\x01" + bytes(4) + SERVER_INIT


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.connections += 1
        self.request.sendall(GREETING)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    """Stands in for a guest's VNC server on loopback: greets as an RFB server naming its
    desktop "fake" (the proxy checks the name), then sends back what it gets."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Echo)
        self.connections = 0

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def echo_servers():
    servers = [EchoServer() for _ in range(3)]
    threads = [
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in servers
    ]
    for t in threads:
        t.start()
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def vms(group_a, group_b, course, echo_servers):
    """vm_a (group A, on h1), vm_b (group B, on h1), vm_a2 (group A, on h2)."""
    Group.objects.filter(pk__in=[group_a.pk, group_b.pk]).update(status=GroupStatus.APPROVED)
    image = Image.objects.create(name="deb", os="Debian 12", path="/srv/base.qcow2")
    h1, h2 = (
        Host.objects.create(name=n, uri="qemu:///system", vcpus=8, memory_mib=8192, disk_gib=99)
        for n in ("h1", "h2")
    )

    def vm(group, name, host, echo):
        return Vm.objects.create(
            group=group,
            name=name,
            host=host,
            image=image,
            vcpus=1,
            memory_mib=1024,
            disk_gib=10,
            observed_state=ObservedState.RUNNING,
            vnc_host="127.0.0.1",
            vnc_port=echo.port,
            vnc_name="fake",
        )

    a, b, a2 = echo_servers
    return vm(group_a, "vm1", h1, a), vm(group_b, "vm1", h1, b), vm(group_a, "vm2", h2, a2)


# --- the proxy process ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy(django_db_setup, tmp_path_factory):
    """`manage.py console_proxy` for host h1 on a free loopback port; stopped by its PID."""
    port = _free_port()
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    env = {
        **os.environ,
        **child_db_env(),
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "SITE_URL": ORIGIN,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "console_proxy", "--listen", f"127.0.0.1:{port}"]
            + ["--host", "h1", "--recheck", "1"],
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


def session_of(client, user) -> str:
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def ticket_for(user, vm, session_key, *, view_only=False) -> str:
    return consoles.ticket_issue(user=user, vm=vm, session_key=session_key, view_only=view_only)


def open_console(proxy, vm, token=None, *, session_key=None, origin=ORIGIN, query=""):
    headers = {}
    if session_key:
        headers["Cookie"] = f"{settings.SESSION_COOKIE_NAME}={session_key}"
    return connect(
        f"ws://127.0.0.1:{proxy['port']}/ws/vms/{vm.pk}/console/{query}",
        subprotocols=[consoles.SUBPROTOCOL_PREFIX + token] if token else None,
        additional_headers=headers,
        origin=origin,
        proxy=None,
        compression=None,
        open_timeout=10,
        close_timeout=5,
    )


def recv_exactly(ws, size: int) -> bytes:
    received = b""
    while len(received) < size:
        received += ws.recv(timeout=10)
    return received


def hello(ws) -> None:
    """The browser's first words: its protocol version, after which the server's greeting
    (and the echo of the version) arrive."""
    ws.send(VERSION)
    assert recv_exactly(ws, len(GREETING) + len(VERSION)) == GREETING + VERSION


def refused(proxy, vm, token=None, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as error:
        open_console(proxy, vm, token, **kwargs).close()
    return error.value.response.status_code


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- tests ---------------------------------------------------------------------------------


def test_bytes_round_trip_through_the_proxy(proxy, vms, alice, client, echo_servers):
    vm_a, _, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    payload = secrets.token_bytes(300_000)

    with open_console(proxy, vm_a, token, session_key=session_key) as ws:
        assert ws.subprotocol == consoles.SUBPROTOCOL_PREFIX + token
        hello(ws)
        for i in range(0, len(payload), 50_000):
            ws.send(payload[i : i + 50_000])
        received = b""
        while len(received) < len(payload):
            received += ws.recv(timeout=10)
    assert received == payload
    assert echo_servers[0].connections == 1

    # The connection is on record: who, which VM, how many bytes each way.
    assert wait_for(lambda: ConsoleSession.objects.filter(ended_at__isnull=False).exists())
    record = ConsoleSession.objects.get()
    assert (record.user, record.vm, record.view_only) == (alice, vm_a, False)
    assert record.bytes_to_vm == len(VERSION) + len(payload)
    assert record.bytes_from_vm == len(GREETING) + len(VERSION) + len(payload)
    assert token not in proxy["log"].read_text()


def test_a_used_ticket_is_refused(proxy, vms, alice, client):
    vm_a, _, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    with open_console(proxy, vm_a, token, session_key=session_key) as ws:
        hello(ws)
        ws.send(b"RFB")
        assert ws.recv(timeout=10) == b"RFB"
    assert refused(proxy, vm_a, token, session_key=session_key) == 403


def test_a_ticket_for_another_groups_vm_is_refused(proxy, vms, alice, client, echo_servers):
    _, vm_b, _ = vms
    session_key = session_of(client, alice)
    # Issued directly (the portal's view would have said 404): the proxy re-checks.
    token = ticket_for(alice, vm_b, session_key)
    assert refused(proxy, vm_b, token, session_key=session_key) == 403
    assert echo_servers[1].connections == 0


def test_a_ticket_used_on_another_vms_path_is_refused(proxy, vms, alice, client, echo_servers):
    vm_a, vm_b, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    assert refused(proxy, vm_b, token, session_key=session_key) == 403
    assert echo_servers[0].connections == echo_servers[1].connections == 0


def test_a_vm_on_another_host_is_not_served_here(proxy, vms, alice, client, echo_servers):
    _, _, vm_a2 = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a2, session_key)
    assert refused(proxy, vm_a2, token, session_key=session_key) == 403
    assert echo_servers[2].connections == 0


def test_a_ticket_needs_the_browser_session_it_was_issued_to(proxy, vms, alice, bob, client):
    vm_a, _, _ = vms
    alices = session_of(client, alice)
    from django.test import Client

    bobs = session_of(Client(), bob)
    assert refused(proxy, vm_a, ticket_for(alice, vm_a, alices)) == 403  # no cookie
    assert refused(proxy, vm_a, ticket_for(alice, vm_a, alices), session_key=bobs) == 403
    assert refused(proxy, vm_a, ticket_for(alice, vm_a, alices), session_key="nope") == 403


def test_a_signed_out_session_is_refused(proxy, vms, alice, client):
    vm_a, _, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    client.logout()
    assert refused(proxy, vm_a, token, session_key=session_key) == 403


def test_tickets_in_the_url_are_ignored_and_left_unspent(proxy, vms, alice, client):
    vm_a, _, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    assert refused(proxy, vm_a, session_key=session_key, query=f"?token={token}") == 403
    assert ticket_consume(token=token) is not None  # the proxy never looked at it


def test_a_foreign_origin_is_refused(proxy, vms, alice, client):
    vm_a, _, _ = vms
    session_key = session_of(client, alice)
    token = ticket_for(alice, vm_a, session_key)
    assert refused(proxy, vm_a, token, session_key=session_key, origin="http://evil.test") == 403


def test_an_observers_input_never_reaches_the_vm(proxy, vms, ines, client, echo_servers):
    vm_a, _, _ = vms
    session_key = session_of(client, ines)
    token = ticket_for(ines, vm_a, session_key, view_only=True)
    handshake = b"RFB 003.008\n" + b"\x01" + b"\x00"  # version, security None, ClientInit
    key_event = struct.pack(">BBHI", 4, 1, 0, 0x61)  # "a" pressed
    update_request = struct.pack(">BBHHHH", 3, 1, 0, 0, 640, 480)
    with open_console(proxy, vm_a, token, session_key=session_key) as ws:
        ws.send(handshake + key_event + update_request)
        # The server's greeting, then the echo: shared, no key.
        expected = GREETING + b"RFB 003.008\n" + b"\x01" + b"\x01" + update_request
        received = recv_exactly(ws, len(expected))
    assert received == expected
    assert wait_for(lambda: ConsoleSession.objects.filter(ended_at__isnull=False).exists())
    assert ConsoleSession.objects.get().view_only is True


def test_a_session_ends_when_the_vm_stops(proxy, vms, bob, client):
    vm_a, _, _ = vms
    session_key = session_of(client, bob)
    with open_console(
        proxy, vm_a, ticket_for(bob, vm_a, session_key), session_key=session_key
    ) as ws:
        hello(ws)
        ws.send(b"still here")
        assert ws.recv(timeout=10) == b"still here"
        Vm.objects.filter(pk=vm_a.pk).update(observed_state=ObservedState.SHUTOFF)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)  # the proxy re-checks every second (--recheck 1)
    assert closed.value.rcvd.code == CloseCode.REVOKED


def test_an_instructor_can_drive_through_the_proxy(proxy, vms, ines, client):
    vm_a, _, _ = vms
    session_key = session_of(client, ines)
    with open_console(
        proxy, vm_a, ticket_for(ines, vm_a, session_key), session_key=session_key
    ) as ws:
        hello(ws)
        ws.send(b"hello")
        assert ws.recv(timeout=10) == b"hello"


def test_the_ticket_is_read_from_the_subprotocol_header_only():
    assert ticket_from_protocols("binary, stratus.ticket.abc") == "abc"
    assert ticket_from_protocols("stratus.ticket.xyz") == "xyz"
    assert ticket_from_protocols("binary") is None
    assert ticket_from_protocols("stratus.ticket.a, stratus.ticket.b") is None
    assert ticket_from_protocols("") is None


def test_ticket_consume_takes_a_ticket_once(alice, vms, client):
    vm_a, _, _ = vms
    token = ticket_for(alice, vm_a, session_of(client, alice))
    first = ticket_consume(token=token)
    assert (first.user_id, first.vm_id, first.view_only) == (alice.pk, vm_a.pk, False)
    assert ticket_consume(token=token) is None
    assert ticket_consume(token="") is None and ticket_consume(token="x" * 200) is None


def test_a_server_announcing_another_vm_is_closed_before_its_screen(proxy, vms, alice, client):
    vm_a, _, _ = vms
    Vm.objects.filter(pk=vm_a.pk).update(vnc_name="QEMU (someone else)")
    session_key = session_of(client, alice)
    with open_console(
        proxy, vm_a, ticket_for(alice, vm_a, session_key), session_key=session_key
    ) as ws:
        ws.send(VERSION)
        received = b""
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received += ws.recv(timeout=10)
    assert closed.value.rcvd.code == CloseCode.REVOKED
    assert SERVER_INIT not in received and b"fake" not in received


# --- the standalone proxy's own defences (issue 10, item 7) and the per-user cap ---------

LAX_PREFIX = f"stratus-test-lax-proxy-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def lax_proxy(django_db_setup, tmp_path_factory):
    """A proxy on another site (`--allow-without-session`) for host h9, at most two
    connections, two seconds for the request, one console per user."""
    port = _free_port()
    log = tmp_path_factory.mktemp("lax-proxy") / "proxy.log"
    env = {
        **os.environ,
        **child_db_env(),
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "SITE_URL": ORIGIN,
        "CHANNEL_LAYER_PREFIX": LAX_PREFIX,
        "CONSOLE_MAX_PER_USER": "1",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "console_proxy", "--listen", f"127.0.0.1:{port}"]
            + ["--host", "h9", "--allow-without-session"]
            + ["--max-connections", "2", "--header-timeout", "2"],
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


@pytest.fixture
def remote_vms(vms, settings, echo_servers):
    """Group A's and group B's VMs on h9, a hypervisor the portal reaches over SSH: the
    proxy runs beside it, so the recorded loopback endpoint is its own."""
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"]["CONFIG"]["prefix"] = LAX_PREFIX  # the leases the proxy counts
    settings.CHANNEL_LAYERS = layers
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match=f"{LAX_PREFIX}:sockets:*"):
        client.delete(key)
    client.close()
    h9 = Host.objects.create(
        name="h9", uri="qemu+ssh://stratus@hv9.example/system", vcpus=8, memory_mib=8192,
        disk_gib=99,
    )  # fmt: skip
    vm_a, vm_b, _ = vms
    Vm.objects.filter(pk__in=[vm_a.pk, vm_b.pk]).update(host=h9)
    return Vm.objects.get(pk=vm_a.pk), Vm.objects.get(pk=vm_b.pk)


def _forge(vm, user, *, mac=None) -> str:
    """A ticket written straight into Redis by someone without the SECRET_KEY."""
    token = secrets.token_urlsafe(32)
    fields = {"user_id": user.pk, "vm_id": vm.pk, "session_hash": "", "view_only": False}
    if mac is not None:
        fields["mac"] = mac
    key = consoles.TICKET_PREFIX + hashlib.sha256(token.encode()).hexdigest()
    redis.Redis.from_url(settings.REDIS_URL).set(key, json.dumps(fields), ex=30)
    return token


def test_a_ticket_the_portal_issued_opens_a_proxy_without_sessions(lax_proxy, remote_vms, alice):
    vm_a, _ = remote_vms
    token = ticket_for(alice, vm_a, "a-session-on-the-portal")
    with open_console(lax_proxy, vm_a, token) as ws:
        hello(ws)
        ws.send(b"RFB")
        assert ws.recv(timeout=10) == b"RFB"


@pytest.mark.parametrize("mac", [None, "0" * 64])
def test_a_ticket_written_into_redis_without_the_secret_key_opens_nothing(
    lax_proxy, remote_vms, alice, echo_servers, mac
):
    vm_a, _ = remote_vms
    assert refused(lax_proxy, vm_a, _forge(vm_a, alice, mac=mac)) == 403
    assert echo_servers[0].connections == 0


def test_a_signed_ticket_moved_to_another_token_opens_nothing(lax_proxy, remote_vms, alice):
    vm_a, _ = remote_vms
    genuine = ticket_for(alice, vm_a, "s")
    client = redis.Redis.from_url(settings.REDIS_URL)
    value = client.get(consoles.TICKET_PREFIX + hashlib.sha256(genuine.encode()).hexdigest())
    moved = secrets.token_urlsafe(32)
    client.set(consoles.TICKET_PREFIX + hashlib.sha256(moved.encode()).hexdigest(), value, ex=30)
    assert refused(lax_proxy, vm_a, moved) == 403


def test_the_proxy_serves_only_its_own_hosts_vms(lax_proxy, remote_vms, vms, alice):
    _, _, vm_a2 = vms  # group A's VM on h2 (qemu:///system: "local" to anyone)
    assert refused(lax_proxy, vm_a2, ticket_for(alice, vm_a2, "s")) == 403


def test_a_user_gets_no_more_consoles_than_the_cap(lax_proxy, remote_vms, alice, bob):
    vm_a, _ = remote_vms
    with open_console(lax_proxy, vm_a, ticket_for(alice, vm_a, "s")) as first:
        hello(first)
        first.send(b"1")
        assert first.recv(timeout=10) == b"1"
        assert refused(lax_proxy, vm_a, ticket_for(alice, vm_a, "s")) == 429
        with open_console(lax_proxy, vm_a, ticket_for(bob, vm_a, "s")) as bobs:  # his own
            hello(bobs)
            bobs.send(b"2")
            assert bobs.recv(timeout=10) == b"2"
    # Closing frees the place at once.
    assert wait_for(lambda: ConsoleSession.objects.filter(ended_at__isnull=True).count() == 0)
    with open_console(lax_proxy, vm_a, ticket_for(alice, vm_a, "s")) as again:
        hello(again)
        again.send(b"3")
        assert again.recv(timeout=10) == b"3"


def test_the_proxy_serves_at_most_its_connection_cap(lax_proxy, remote_vms, alice, bob, ines):
    vm_a, _ = remote_vms
    with (
        open_console(lax_proxy, vm_a, ticket_for(alice, vm_a, "s")) as one,
        open_console(lax_proxy, vm_a, ticket_for(bob, vm_a, "s")) as two,
    ):
        for ws in (one, two):
            hello(ws)
            ws.send(b"x")
            assert ws.recv(timeout=10) == b"x"
        assert refused(lax_proxy, vm_a, ticket_for(ines, vm_a, "s")) == 503
    # The slots free when the connections' processes end.
    assert wait_for(lambda: _opens(lax_proxy, vm_a, ticket_for(ines, vm_a, "s")))


def _opens(proxy, vm, token) -> bool:
    try:
        with open_console(proxy, vm, token) as ws:
            hello(ws)
            ws.send(b"y")
            return ws.recv(timeout=10) == b"y"
    except InvalidStatus:
        return False


def test_a_client_sending_its_request_slowly_is_dropped(lax_proxy):
    request = b"GET /ws/vms/1/console/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
    with socket.create_connection(("127.0.0.1", lax_proxy["port"])) as sock:
        started = time.monotonic()
        sock.settimeout(0.4)
        dropped_after = None
        for byte in request:  # one byte every 0.4 s: 20 s for the whole request
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    dropped_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                dropped_after = time.monotonic() - started
                break
    assert dropped_after is not None and dropped_after < 4, dropped_after


def test_the_proxy_will_not_start_without_a_host():
    result = subprocess.run(
        [sys.executable, "manage.py", "console_proxy", "--listen", "127.0.0.1:1"],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--host" in result.stderr
