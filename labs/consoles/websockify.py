"""The console proxy for a hypervisor: websockify 0.13, taking Stratus console tickets.

Operators who would rather not carry VNC bytes through the web process run
``manage.py console_proxy`` next to libvirt on each hypervisor (docs/console-client.md).
It accepts the same single-use tickets the portal hands to browsers, and the same way: in
the websocket subprotocol ``stratus.ticket.<token>``, never in the URL.

Stock websockify 0.13 reads a token only from the ``?token=`` query (or the Host header),
never echoes a subprotocol other than ``binary``, and logs unknown tokens verbatim. So the
request handler here is a subclass that takes the ticket from ``Sec-WebSocket-Protocol``,
echoes that protocol (browsers drop a connection whose offered protocol is not echoed),
ignores the query, answers refusals with a plain 403 and logs why without the token.

What a connection must bring, checked in this order before the VM's socket is opened:

1. an ``Origin`` among the allowed origins (the portal's SITE_URL and CSRF_TRUSTED_ORIGINS
   unless the command names others);
2. the portal's session cookie for a signed-in, active user whose session auth hash still
   verifies (a password change ends it), read with Django's SessionStore and never written;
   ``--allow-without-session`` drops this check for proxies on another site, where the
   browser does not send the portal's cookie;
3. a ticket, consumed atomically (Redis GETDEL of its SHA-256: it works once);
4. the ticket's user and session hash match that session, and the path's VM id
   (``/ws/vms/<id>/console/``, when the path has one) is the ticket's;
5. the same access rules as the portal's consumer (``rules.target_for``:
   member of the approved group or course staff, view-only only for staff, VM running,
   VNC on loopback or a unix socket), and the VM is on this proxy's host (``--host``
   is required: a proxy beside one hypervisor serves that host's VMs, whatever its libvirt
   URI says, and no other host's);
6. the user has fewer than CONSOLE_MAX_PER_USER consoles open (``labs.consoles.leases``,
   counted with the portal's own consoles).

Observe-mode tickets get the same input filter as in the portal (``rfb.ClientStreamFilter``
drops key, pointer, clipboard and power messages from the browser). While a session runs,
every ``RECHECK_SECONDS`` (``--recheck``) the handler re-reads step 5 and the limits
(``rules.Limits``) and closes the websocket when they no longer hold: there is no channel
layer in the proxy loop. Revocations are as prompt as in the portal: each connection's
process also listens on the channel layer (``console.vm.<id>``, ``console.user.<id>``, the
groups the Channels transport listens on) in a thread, which re-checks access and the
browser session when ``labs.people.revocation`` says access may have ended and shuts the
VNC socket down when it has; the proxy loop then ends the websocket with
``CloseCode.REVOKED`` within the second. Each connection is one ConsoleSession row (who,
which VM, bytes, why it ended).

The server itself: at most ``--max-connections`` connections at once (one process each;
a lock file per slot, so a killed process frees its slot) and ``--header-timeout`` seconds
for a client to send its whole HTTP request (a client sending it byte by byte is dropped).

Steps 3-5 and the close codes are ``labs.consoles.rules``, the same as the Channels
transport's; only the transport (forked processes, websockify's frames) differs.
"""

import asyncio
import contextlib
import fcntl
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections
from django.http.cookie import parse_cookie
from websockify import websocketproxy, websockifyserver
from websockify.token_plugins import BasePlugin

from labs.consoles import leases, rules, tickets
from labs.consoles.rfb import (
    ClientStreamFilter,
    RfbProtocolError,
    ServerStreamWatcher,
    WrongDesktop,
)
from labs.consoles.rules import CloseCode, ConsoleDenied
from labs.consoles.sessions import session_hash, session_signed_in, session_user_id
from labs.consoles.tickets import SUBPROTOCOL_PREFIX

logger = logging.getLogger(__name__)

RECHECK_SECONDS = 15
_PATH_VM_ID = re.compile(r"/vms/(\d+)(?:/|$)")


class TicketRefused(Exception):
    """Why a connection gets no VM. The text is logged; the ticket never is."""


@dataclass(frozen=True)
class ProxyTarget:
    user_id: int
    vm_id: int
    view_only: bool
    host: str  # "unix_socket" for a unix socket (websockify's convention)
    port: int | str  # the socket's path then
    desktop_name: str = ""  # what the VNC server must announce (rfb.ServerStreamWatcher)


# --- the pieces ------------------------------------------------------------------------


def ticket_from_protocols(header: str) -> str | None:
    """The token of the one ``stratus.ticket.<token>`` subprotocol offered in the header;
    None when there is none, more than one, or a malformed one (``rules``)."""
    try:
        return rules.token_from_protocols(header.split(","))[1]
    except ConsoleDenied:
        return None


def origin_normalize(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def default_allowed_origins() -> list[str]:
    origins = [settings.SITE_URL, *settings.CSRF_TRUSTED_ORIGINS]
    return sorted({o for o in map(origin_normalize, origins) if o})


# --- the token plugin ------------------------------------------------------------------


class StratusTicketPlugin(BasePlugin):
    """A websockify token plugin that consumes Stratus console tickets.

    ``lookup(token)`` keeps websockify's plugin interface; the request handler below also
    passes the session cookie, the Origin and the path. Without a session (stock
    websockify), lookups fail unless the plugin was made with ``require_session=False``.
    """

    def __init__(
        self,
        src: str | None = None,
        *,
        host_name: str,
        allowed_origins: list[str] | None = None,
        require_session: bool = True,
    ):
        super().__init__(src)
        self.host_name = host_name
        self.allowed_origins = frozenset(
            origin_normalize(o)
            for o in (default_allowed_origins() if allowed_origins is None else allowed_origins)
        )
        self.require_session = require_session

    def lookup(self, token, *, session_key=None, origin=None, path=""):
        try:
            target = self.target_for(
                token=token, session_key=session_key, origin=origin, path=path
            )
        except TicketRefused as refusal:
            logger.warning("console proxy refused a connection: %s", refusal)
            return None
        return target.host, target.port

    def target_for(
        self, *, token: str, session_key: str | None, origin: str | None, path: str = ""
    ) -> ProxyTarget:
        if self.allowed_origins and origin_normalize(origin or "") not in self.allowed_origins:
            raise TicketRefused(f"origin {origin!r} is not allowed")
        user_id = None
        if session_key:
            user_id = session_user_id(session_key=session_key)
            if user_id is None:
                raise TicketRefused("the session cookie is not a signed-in session")
        elif self.require_session:
            raise TicketRefused("no session cookie")

        ticket = tickets.ticket_consume(token=token)
        match = _PATH_VM_ID.search(urlsplit(path).path)
        try:
            ticket = rules.ticket_binding_check(
                ticket,
                user_id=user_id,
                session_key=session_key if user_id is not None else None,
                vm_id=int(match.group(1)) if match else None,
            )
        except ConsoleDenied as denied:
            raise TicketRefused(str(denied)) from None
        return self.target_check(
            user_id=ticket.user_id, vm_id=ticket.vm_id, view_only=ticket.view_only
        )

    def target_check(self, *, user_id: int, vm_id: int, view_only: bool) -> ProxyTarget:
        """Where this console connects now: the portal's access rules, re-read from the
        database, and the VM must be on this proxy's host."""
        if not self.host_name:
            raise TicketRefused("the proxy serves no host (--host is required)")
        try:
            target = rules.target_for(
                user_id=user_id, vm_id=vm_id, view_only=view_only, served_host=self.host_name
            )
        except ConsoleDenied as denied:
            raise TicketRefused(f"user {user_id}, VM {vm_id}: {denied}") from None
        endpoint = target.endpoint
        if endpoint.socket:
            return ProxyTarget(
                user_id, vm_id, view_only, "unix_socket", endpoint.socket, target.desktop_name
            )
        return ProxyTarget(
            user_id, vm_id, view_only, endpoint.host, endpoint.port, target.desktop_name
        )


# --- websockify, taught to take tickets from the subprotocol ---------------------------


class TicketSubprotocolWebSocket(websockifyserver.CompatibleWebSocket):
    def select_subprotocol(self, protocols):
        # Echo the ticket protocol the browser offered (the ticket is spent by now).
        for offered in protocols:
            if offered.strip().startswith(SUBPROTOCOL_PREFIX):
                return offered
        return super().select_subprotocol(protocols)


class _SessionOver(Exception):
    """(close code, reason): ``rules.CloseCode``, as the Channels transport closes with."""


class StratusProxyRequestHandler(websocketproxy.ProxyRequestHandler):
    """One browser connection, in its own process (websockify forks per connection)."""

    SocketClass = TicketSubprotocolWebSocket

    def validate_connection(self):
        plugin: StratusTicketPlugin = self.server.token_plugin
        token = ticket_from_protocols(self.headers.get("Sec-WebSocket-Protocol", ""))
        try:
            if token is None:
                raise TicketRefused("no ticket subprotocol (tickets in URLs are not accepted)")
            target = plugin.target_for(
                token=token,
                session_key=self._session_key(),
                origin=self.headers.get("Origin"),
                path=self.path,
            )
        except TicketRefused as refusal:
            logger.warning("console proxy refused %s: %s", self.client_address[0], refusal)
            self.send_error(HTTPStatus.FORBIDDEN, "Console access refused")
            raise self.server.EClose("") from None
        self.session_key = self._session_key()
        self.lease = leases.lease_take(kind=leases.CONSOLE, user_id=target.user_id)
        if self.lease is None:
            logger.warning(
                "console proxy refused %s: user %s has CONSOLE_MAX_PER_USER consoles open",
                self.client_address[0],
                target.user_id,
            )
            self.send_error(HTTPStatus.TOO_MANY_REQUESTS, "Too many consoles open")
            raise self.server.EClose("")
        self.target = target
        self.started_at = time.monotonic()
        self.last_input_at = self.started_at
        self.bytes_to_vm = 0
        self.bytes_from_vm = 0
        self.limits = rules.Limits.now()
        self.input_filter = ClientStreamFilter(drop_input=target.view_only)
        self.server_watch = ServerStreamWatcher(expected_name=target.desktop_name)
        if target.host == "unix_socket":
            self.server.unix_target = target.port
        else:
            self.server.target_host, self.server.target_port = target.host, target.port

    def _session_key(self) -> str | None:
        cookies = parse_cookie(self.headers.get("Cookie", ""))
        return cookies.get(settings.SESSION_COOKIE_NAME) or None

    def handle_upgrade(self):
        header_deadline_cancel()  # the whole request is in
        super().handle_upgrade()

    def new_websocket_client(self):
        session_id = rules.session_start(
            user_id=self.target.user_id, vm_id=self.target.vm_id, view_only=self.target.view_only
        )
        reason = "closed"
        try:
            self._revocations_start()
            super().new_websocket_client()
        except self.CClose as close:
            code, text = (list(close.args) + [1000, ""])[:2]
            reason = str(text) or f"websocket close {code}"
            if self.revoked is not None:  # the VNC socket was shut down for a revocation
                reason = f"revoked: {self.revoked}"
                raise self.CClose(CloseCode.REVOKED, self.revoked) from None
            raise
        except Exception as error:
            if self.revoked is not None:
                reason = f"revoked: {self.revoked}"
                raise self.CClose(CloseCode.REVOKED, self.revoked) from None
            reason = f"error: {type(error).__name__}"
            raise
        finally:
            self._revocations_stop()
            rules.session_end(
                session_id=session_id,
                bytes_to_vm=self.bytes_to_vm,
                bytes_from_vm=self.bytes_from_vm,
                close_reason=reason,
            )

    def recv_frames(self):
        bufs, closed = super().recv_frames()
        if bufs:
            self.last_input_at = time.monotonic()
            for data in bufs:
                self.server_watch.client_feed(data)
            try:
                bufs = [data for data in map(self.input_filter.feed, bufs) if data]
            except RfbProtocolError as error:
                raise self.CClose(CloseCode.PROTOCOL_ERROR, f"protocol error: {error}") from None
            self.bytes_to_vm += sum(len(b) for b in bufs)
        return bufs, closed

    def send_frames(self, bufs=None):
        # websockify sends only the VNC server's bytes through here (and an empty list to
        # flush): nothing of them reaches the browser before the desktop name checks out.
        if bufs:
            self.bytes_from_vm += sum(len(b) for b in bufs)
            try:
                bufs = [data for data in map(self.server_watch.feed, bufs) if data]
            except WrongDesktop as wrong:
                logger.warning("console proxy closes a session: %s", wrong)
                raise self.CClose(CloseCode.REVOKED, "not this VM's console") from None
            except RfbProtocolError as error:
                raise self.CClose(CloseCode.SERVER_ERROR, "VNC server protocol error") from (error)
        return super().send_frames(bufs)

    def send_ping(self, data=b""):
        # websockify calls this every `heartbeat` seconds from its proxy loop, between
        # reads and writes: the safe place to end a session that may no longer run.
        try:
            self._session_check()
        except _SessionOver as over:
            raise self.CClose(*over.args) from None
        super().send_ping(data)

    def _session_check(self):
        over = self.limits.over(
            started=self.started_at, last_input=self.last_input_at, now=time.monotonic()
        )
        if over is not None:
            raise _SessionOver(*over)
        try:
            current = self.server.token_plugin.target_check(
                user_id=self.target.user_id,
                vm_id=self.target.vm_id,
                view_only=self.target.view_only,
            )
        except TicketRefused as refusal:
            logger.info("console proxy ends a session: %s", refusal)
            raise _SessionOver(CloseCode.REVOKED, "access ended") from None
        if (current.host, current.port) != (self.target.host, self.target.port):
            raise _SessionOver(CloseCode.REVOKED, "the VM moved")
        if self.session_key and not session_signed_in(
            session_key=self.session_key, user_id=self.target.user_id
        ):
            raise _SessionOver(CloseCode.REVOKED, "the browser session signed out")

    def finish(self):
        try:
            super().finish()
        finally:
            lease = getattr(self, "lease", None)
            if lease is not None:
                leases.lease_drop(kind=leases.CONSOLE, user_id=self.target.user_id, lease=lease)
            connections.close_all()

    # -- revocation within the second (a thread on the channel layer) ------------------

    revoked: str | None = None  # why the session was ended from the listener thread
    _target_socket: socket.socket | None = None
    _revocations: "RevocationListener | None" = None

    def do_proxy(self, target):
        self._target_socket = target  # what the listener shuts down to end the session
        if self.revoked is not None:
            raise self.CClose(CloseCode.REVOKED, self.revoked)
        return super().do_proxy(target)

    def _revocations_start(self) -> None:
        """Listen for revocations of this VM and this user, then check once more: a
        revocation sent between validate_connection and the subscription is not lost."""
        self._revocations = RevocationListener(self)
        if not self._revocations.start():
            raise self.CClose(CloseCode.SERVER_ERROR, "revocation channel unavailable")
        try:
            self._session_check()
        except _SessionOver as over:
            raise self.CClose(*over.args) from None

    def _revocations_stop(self) -> None:
        if self._revocations is not None:
            self._revocations.stop()

    def revoke(self, reason: str) -> None:
        """From the listener thread: end the session now (the proxy loop sees the VNC
        socket close and ``new_websocket_client`` turns that into ``REVOKED``)."""
        if self.revoked is not None:
            return
        self.revoked = reason[:80]
        logger.info(
            "console proxy ends a session: user %s, VM %s: %s",
            self.target.user_id,
            self.target.vm_id,
            self.revoked,
        )
        if self._target_socket is not None:
            with contextlib.suppress(OSError):
                self._target_socket.shutdown(socket.SHUT_RDWR)

    def still_allowed(self) -> bool:
        """From the listener thread: access and browser session, checked again."""
        try:
            self.server.token_plugin.target_check(
                user_id=self.target.user_id,
                vm_id=self.target.vm_id,
                view_only=self.target.view_only,
            )
            return not self.session_key or session_signed_in(
                session_key=self.session_key, user_id=self.target.user_id
            )
        except TicketRefused:
            return False
        except Exception:  # cannot tell: the session must not outlive its access
            logger.exception("console proxy: access re-check failed")
            return False
        finally:
            connections.close_all()  # this thread's connection


class RevocationListener:
    """One connection's ears on the channel layer, in a thread with its own event loop.

    Joins ``console.vm.<id>`` (``tickets.console_revoke``: the VM stopped, moved, was
    deleted) and ``console.user.<id>`` (``tickets.console_access_recheck``) and, like the
    Channels transport, closes on a revocation for everyone or for this user, on a
    re-check that fails, and on a sign-out of this browser session. It also renews the
    connection's lease (``labs.consoles.leases``).
    """

    SUBSCRIBE_TIMEOUT = 5.0

    def __init__(self, handler: StratusProxyRequestHandler) -> None:
        self.handler = handler
        self.target = handler.target
        self._ready = threading.Event()
        self._failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)

    def start(self) -> bool:
        self._thread.start()
        return self._ready.wait(self.SUBSCRIBE_TIMEOUT) and not self._failed

    def stop(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            logger.exception("console proxy: revocation listener failed")
            listening = self._ready.is_set()
            self._failed = True
            self._ready.set()
            if listening:  # a session must not go on without its revocations
                self.handler.revoke("revocation channel lost")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        layer = get_channel_layer()
        if layer is None:
            raise RuntimeError("no channel layer: revocation would not work")
        channel = await layer.new_channel()
        groups = [tickets.vm_group(self.target.vm_id), tickets.user_group(self.target.user_id)]
        for group in groups:
            await layer.group_add(group, channel)
        keep = asyncio.create_task(self._lease_keep())
        self._ready.set()
        try:
            while True:
                await self._handle(await layer.receive(channel))
        except asyncio.CancelledError:
            pass
        finally:
            keep.cancel()
            for group in groups:
                with contextlib.suppress(Exception):
                    await layer.group_discard(group, channel)

    async def _handle(self, event: dict) -> None:
        kind = event.get("type")
        user_id = event.get("user_id")
        if user_id is not None and user_id != self.target.user_id:
            return
        reason = str(event.get("reason") or "access ended")
        if kind == "console.revoke":
            self.handler.revoke(reason)
        elif kind == tickets.RECHECK_MESSAGE:
            ended = event.get("session_hash")
            session_key = self.handler.session_key
            signed_out = bool(ended and session_key and ended == session_hash(session_key))
            if signed_out or not await asyncio.to_thread(self.handler.still_allowed):
                self.handler.revoke(reason)

    async def _lease_keep(self) -> None:
        lease = self.handler.lease
        while True:
            await asyncio.sleep(leases.RENEW_SECONDS)
            await asyncio.to_thread(
                leases.lease_renew, kind=leases.CONSOLE, user_id=self.target.user_id, lease=lease
            )


# --- the server: a cap on connections, a deadline for the request ---------------------


class _HeaderTimeout(TimeoutError):
    """The client did not send its whole HTTP request in time."""


def _header_timeout(signum, frame):
    raise _HeaderTimeout("the HTTP request took too long")


def header_deadline_cancel() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


class ConnectionSlots:
    """At most ``size`` connections at once, across the proxy's forked processes: a
    connection holds an exclusive ``flock`` on one of ``size`` files, which the kernel
    releases when the process ends, however it ends."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.directory = tempfile.mkdtemp(prefix="stratus-console-proxy-")

    def take(self) -> int | None:
        """A file descriptor holding a slot, or None when every slot is taken."""
        for index in range(self.size):
            fd = os.open(os.path.join(self.directory, f"slot-{index}"), os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\nThe console proxy is at capacity.\r\n"
)


class StratusWebSocketProxy(websocketproxy.WebSocketProxy):
    """websockify's server with a connection cap and a deadline for the HTTP request."""

    def __init__(self, *args, max_connections: int, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = ConnectionSlots(max_connections)
        self.header_timeout = header_timeout

    def top_new_client(self, startsock, address):
        # In the connection's own (forked) process.
        slot = self.slots.take()
        if slot is None:
            logger.warning(
                "console proxy refused %s: %d connections open", address[0], self.slots.size
            )
            with contextlib.suppress(OSError):
                startsock.sendall(BUSY_RESPONSE)
            return
        signal.signal(signal.SIGALRM, _header_timeout)
        signal.setitimer(signal.ITIMER_REAL, self.header_timeout)
        try:
            super().top_new_client(startsock, address)
        finally:
            header_deadline_cancel()
            os.close(slot)


def proxy_server(
    *,
    listen_host: str,
    listen_port: int,
    host_name: str,
    allowed_origins: list[str] | None = None,
    require_session: bool = True,
    cert: str = "",
    key: str = "",
    ssl_only: bool = False,
    recheck_seconds: int = RECHECK_SECONDS,
    max_connections: int | None = None,
    header_timeout: float | None = None,
) -> websocketproxy.WebSocketProxy:
    """A websockify server taking Stratus tickets; ``.start_server()`` runs it (blocking)."""
    if not host_name:
        raise ValueError("the console proxy serves one host: name it")
    plugin = StratusTicketPlugin(
        host_name=host_name, allowed_origins=allowed_origins, require_session=require_session
    )
    return StratusWebSocketProxy(
        max_connections=max_connections or settings.CONSOLE_PROXY_MAX_CONNECTIONS,
        header_timeout=header_timeout or settings.CONSOLE_PROXY_HEADER_TIMEOUT,
        RequestHandlerClass=StratusProxyRequestHandler,
        listen_host=listen_host,
        listen_port=listen_port,
        token_plugin=plugin,
        heartbeat=recheck_seconds,
        cert=cert or "self.pem",
        key=key or None,
        ssl_only=ssl_only,
    )


def proxy_run(server: websocketproxy.WebSocketProxy) -> None:
    """Run the proxy until SIGTERM/SIGINT. One forked process per browser connection."""
    # websockify hands each connection to multiprocessing.Process(target=bound method),
    # which only works with fork; and a forked child must not share the parent's database
    # connections, so the parent holds none.
    multiprocessing.set_start_method("fork", force=True)
    connections.close_all()
    try:
        server.start_server()
    finally:
        server.slots.remove()
