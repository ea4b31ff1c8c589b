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
   VNC on loopback or a unix socket), and the VM is on this proxy's host.

Observe-mode tickets get the same input filter as in the portal (``rfb.ClientStreamFilter``
drops key, pointer, clipboard and power messages from the browser). While a session runs,
every ``RECHECK_SECONDS`` (``--recheck``) the handler re-reads step 5 and the limits
(``rules.Limits``) and closes the websocket when they no longer hold: there is no channel
layer here, so a revocation takes up to that long instead of a second. Each connection is
one ConsoleSession row (who, which VM, bytes, why it ended).

Steps 3-5 and the close codes are ``labs.consoles.rules``, the same as the Channels
transport's; only the transport (forked processes, websockify's frames) differs.
"""

import logging
import multiprocessing
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from importlib import import_module
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.core.exceptions import ValidationError
from django.db import connections
from django.http.cookie import parse_cookie
from django.utils.crypto import constant_time_compare
from websockify import websocketproxy, websockifyserver
from websockify.token_plugins import BasePlugin

from labs.consoles import rules, tickets
from labs.consoles.rfb import (
    ClientStreamFilter,
    RfbProtocolError,
    ServerStreamWatcher,
    WrongDesktop,
)
from labs.consoles.rules import CloseCode, ConsoleDenied
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


def session_user_id(*, session_key: str) -> int | None:
    """The active user signed in with this session, verified the way Django's get_user()
    verifies it (backend, auth hash incl. SECRET_KEY_FALLBACKS) but strictly read-only."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    data = store.load()
    raw_user_id = data.get(SESSION_KEY)
    backend_path = data.get(BACKEND_SESSION_KEY)
    if raw_user_id is None or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    try:
        user_id = get_user_model()._meta.pk.to_python(raw_user_id)
    except ValidationError:
        return None
    user = load_backend(backend_path).get_user(user_id)
    if user is None:  # unknown or inactive
        return None
    stored = data.get(HASH_SESSION_KEY) or ""
    valid = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if not stored or not any(constant_time_compare(stored, h) for h in valid):
        return None
    return user.pk


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
        host_name: str = "",
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
        try:
            target = rules.target_for(user_id=user_id, vm_id=vm_id, view_only=view_only)
        except ConsoleDenied as denied:
            raise TicketRefused(f"user {user_id}, VM {vm_id}: {denied}") from None
        if self.host_name and target.host_name != self.host_name:
            raise TicketRefused(f"VM {vm_id} is not on host {self.host_name}")
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

    def new_websocket_client(self):
        session_id = rules.session_start(
            user_id=self.target.user_id, vm_id=self.target.vm_id, view_only=self.target.view_only
        )
        reason = "closed"
        try:
            super().new_websocket_client()
        except self.CClose as close:
            code, text = (list(close.args) + [1000, ""])[:2]
            reason = str(text) or f"websocket close {code}"
            raise
        except Exception as error:
            reason = f"error: {type(error).__name__}"
            raise
        finally:
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

    def finish(self):
        try:
            super().finish()
        finally:
            connections.close_all()


def proxy_server(
    *,
    listen_host: str,
    listen_port: int,
    host_name: str = "",
    allowed_origins: list[str] | None = None,
    require_session: bool = True,
    cert: str = "",
    key: str = "",
    ssl_only: bool = False,
    recheck_seconds: int = RECHECK_SECONDS,
) -> websocketproxy.WebSocketProxy:
    """A websockify server taking Stratus tickets; ``.start_server()`` runs it (blocking)."""
    plugin = StratusTicketPlugin(
        host_name=host_name, allowed_origins=allowed_origins, require_session=require_session
    )
    return websocketproxy.WebSocketProxy(
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
    server.start_server()
