"""Websocket consumers: the browser console proxy (noVNC <-> the VM's VNC server).

See docs/console.md for the security design. In short: every check happens before
``accept()``, and every refusal is the same bare close (the reason goes to the server log,
without the ticket); after ``accept()`` the consumer is a byte pump with one reader task,
backpressure, time limits, revocation and one audit row per session.
"""

import asyncio
import json
import logging
import re
import secrets
import time

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model

from labs.services import consoles, events
from labs.services.console_access import (
    ConsoleDenied,
    aconsole_session_end,
    aconsole_session_start,
    aconsole_target_for,
)
from labs.services.rfb import ClientStreamFilter, RfbProtocolError

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024  # bytes read from the VNC server per websocket message
CONNECT_TIMEOUT = 5.0  # seconds to reach the VNC server
CLOSE_TIMEOUT = 1.0  # seconds to wait for the VNC connection to close before aborting it
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,100}")

# Close codes the console page can show (after accept only; a refusal is a bare close).
CLOSE_NORMAL = 1000  # the VNC server closed the connection
CLOSE_PROTOCOL_ERROR = 1002  # view-only: the client sent something that is not RFB
CLOSE_UNSUPPORTED = 1003  # a text frame
CLOSE_TOO_BIG = 1009  # a frame over CONSOLE_MAX_FRAME
CLOSE_SERVER_ERROR = 1011
CLOSE_REVOKED = 4001  # the VM stopped, was reset, deleted, migrated; access removed
CLOSE_IDLE = 4002  # no input for CONSOLE_IDLE_TIMEOUT
CLOSE_SESSION_LIMIT = 4003  # CONSOLE_MAX_SESSION reached


class Refused(Exception):
    """Refuse the connection; the message goes to the server log only."""


class ConsoleConsumer(AsyncConsumer):
    """``/ws/vms/<vm_id>/console/``: one browser console session of one VM.

    An ``AsyncConsumer`` with its own receive loop rather than ``AsyncWebsocketConsumer``:

    - Channels' ``dispatch`` runs ``aclose_old_connections`` (a hop to a worker thread)
      before every handler, i.e. for every websocket frame; this consumer never touches
      the ORM outside ``database_sync_to_async``, so it skips that per-frame cost.
    - Channels' ``await_many_dispatch`` handles channel-layer messages between client
      frames, so a revocation would wait behind a write blocked by backpressure; here
      the channel layer has its own task and a revocation closes the session at once.
    """

    def __init__(self) -> None:
        self.vm_id: int | None = None
        self.user_id: int | None = None
        self.view_only = False
        self.close_reason = ""
        self.bytes_to_vm = 0
        self.bytes_from_vm = 0
        self._accepted = False
        self._revoked: str | None = None  # a revocation that arrived before accept()
        self._session_id: int | None = None
        self._grouped = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._filter: ClientStreamFilter | None = None
        self._max_frame = 0
        self._idle_timeout = 0.0
        self._deadline = 0.0
        self._last_input = 0.0
        self._listen_task: asyncio.Task | None = None
        self._reader_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._closing: asyncio.Future | None = None

    # -- the ASGI loop -----------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = None
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    await self.websocket_receive(message)
                elif kind == "websocket.connect":
                    await self.websocket_connect(message)
                elif kind == "websocket.disconnect":
                    await self.websocket_disconnect(message)
                    return
        finally:
            # Also when the server cancels us: the VNC connection, the group and the
            # audit row are closed exactly once.
            await asyncio.shield(self._close("server closed", code=None))

    # -- before accept() ---------------------------------------------------------------

    async def websocket_connect(self, message) -> None:
        try:
            subprotocol = await self._authorise_and_open()
        except (Refused, ConsoleDenied) as refused:
            self._log_refusal(str(refused))
            await self._close("refused", code=CLOSE_NORMAL)
            return
        except Exception:
            log.exception("console: unexpected error while connecting (vm %s)", self.vm_id)
            self._log_refusal("server error")
            await self._close("refused", code=CLOSE_NORMAL)
            return
        await self.base_send({"type": "websocket.accept", "subprotocol": subprotocol})
        self._accepted = True
        now = time.monotonic()
        self._last_input = now
        self._deadline = now + settings.CONSOLE_MAX_SESSION
        self._reader_task = asyncio.create_task(self._pump_from_vnc())
        self._watch_task = asyncio.create_task(self._watch())
        log.info(
            "console session %s opened: user %s, vm %s, %s",
            self._session_id,
            self.user_id,
            self.vm_id,
            "view-only" if self.view_only else "drive",
        )
        if self._revoked is not None:  # revoked while we were connecting
            self._close(
                f"revoked: {self._revoked}", code=CLOSE_REVOKED, browser_reason=self._revoked
            )

    async def _authorise_and_open(self) -> str:
        """Run every check, open the VNC connection; return the subprotocol to accept."""
        self.vm_id = int(self.scope["url_route"]["kwargs"]["vm_id"])
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            self.user_id = user.pk
        # The ticket travels in the subprotocol, never in the URL (which gets logged).
        prefix = consoles.SUBPROTOCOL_PREFIX
        offered = [p for p in self.scope.get("subprotocols") or [] if p.startswith(prefix)]
        if len(offered) != 1:
            raise Refused("no ticket subprotocol" if not offered else "several tickets offered")
        subprotocol = offered[0]
        token = subprotocol.removeprefix(prefix)
        if not _TOKEN.fullmatch(token):
            raise Refused("malformed ticket")
        # Take the ticket first: whatever happens next, it never works again.
        ticket = await consoles.aticket_consume(token=token)
        if ticket is None:
            raise Refused("unknown, used or expired ticket")
        if self.user_id is None:
            raise Refused("not logged in")
        session = self.scope.get("session")
        session_key = session.session_key if session is not None else None
        if not session_key:
            raise Refused("no browser session")
        if ticket.user_id != self.user_id:
            raise Refused(f"ticket belongs to user {ticket.user_id}")
        if ticket.vm_id != self.vm_id:
            raise Refused(f"ticket is for vm {ticket.vm_id}")
        if not secrets.compare_digest(ticket.session_hash, consoles.session_hash(session_key)):
            raise Refused("ticket is from another browser session")
        self.view_only = ticket.view_only
        if self.channel_layer is None:
            raise Refused("no channel layer: revocation would not work")
        # Join the revocation group before reading the VM's state, so a revocation sent
        # after that state changed is never missed (it waits in our channel's queue).
        self.channel_name = await self.channel_layer.new_channel()
        self._listen_task = asyncio.create_task(self._listen())
        await self.channel_layer.group_add(consoles.vm_group(self.vm_id), self.channel_name)
        self._grouped = True
        target = await aconsole_target_for(
            user_id=self.user_id, vm_id=self.vm_id, view_only=self.view_only
        )
        if self._revoked is not None:
            raise Refused(f"revoked while connecting: {self._revoked}")
        # Settings are read per connection (tests override them).
        self._max_frame = settings.CONSOLE_MAX_FRAME
        self._idle_timeout = float(settings.CONSOLE_IDLE_TIMEOUT)
        if self.view_only:
            self._filter = ClientStreamFilter(drop_input=True)
        endpoint = target.endpoint
        try:
            if endpoint.socket:
                opening = asyncio.open_unix_connection(endpoint.socket)
            else:
                opening = asyncio.open_connection(endpoint.host, endpoint.port)
            self._reader, self._writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise Refused(f"VNC server unreachable ({type(error).__name__})") from None
        self._session_id = await aconsole_session_start(
            user_id=self.user_id, vm_id=self.vm_id, view_only=self.view_only
        )
        return subprotocol

    def _log_refusal(self, reason: str) -> None:
        client = self.scope.get("client") or ("?", 0)
        log.warning(
            "console refused: %s (vm %s, user %s, client %s)",
            reason,
            self.vm_id,
            self.user_id,
            client[0],
        )

    # -- the byte pump -----------------------------------------------------------------

    async def websocket_receive(self, message) -> None:
        """Browser to VNC: binary frames only, size-capped, one drain per write."""
        if self._closing is not None or not self._accepted:
            return
        data = message.get("bytes")
        if data is None:
            self._close("text frame", code=CLOSE_UNSUPPORTED)
            return
        if len(data) > self._max_frame:
            self._close("frame too large", code=CLOSE_TOO_BIG)
            return
        self._last_input = time.monotonic()
        if self._filter is not None:
            try:
                data = self._filter.feed(data)
            except RfbProtocolError as error:
                self._close(f"protocol error: {error}", code=CLOSE_PROTOCOL_ERROR)
                return
        if not data:
            return
        writer = self._writer
        try:
            writer.write(data)
            self.bytes_to_vm += len(data)
            await writer.drain()  # backpressure: stop reading the browser while VNC lags
        except OSError:
            self._close("VNC connection lost", code=CLOSE_NORMAL)

    async def _pump_from_vnc(self) -> None:
        """VNC to browser: the one reader task."""
        reader, send = self._reader, self.base_send
        reason, code = "VNC closed", CLOSE_NORMAL
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                self.bytes_from_vm += len(data)
                await send({"type": "websocket.send", "bytes": data})
        except OSError:  # includes the ASGI server's "client disconnected"
            reason = "connection lost"
        except Exception:
            log.exception("console session %s: reader failed", self._session_id)
            reason, code = "server error", CLOSE_SERVER_ERROR
        self._close(reason, code=code)

    async def _watch(self) -> None:
        """Close the session after CONSOLE_IDLE_TIMEOUT without input or at the limit."""
        while True:
            now = time.monotonic()
            idle_at = self._last_input + self._idle_timeout
            if now >= self._deadline:
                self._close("session limit", code=CLOSE_SESSION_LIMIT)
                return
            if now >= idle_at:
                self._close("idle timeout", code=CLOSE_IDLE)
                return
            await asyncio.sleep(min(idle_at, self._deadline) - now)

    # -- revocation --------------------------------------------------------------------

    async def _listen(self) -> None:
        """Channel-layer messages, in their own task so they never wait behind a frame."""
        try:
            while True:
                event = await self.channel_layer.receive(self.channel_name)
                if event.get("type") == "console.revoke":
                    await self.console_revoke(event)
        except Exception:
            # Without its revocation channel a session must not go on.
            log.exception("console session %s: channel layer failed", self._session_id)
            self._close("revocation channel lost", code=CLOSE_SERVER_ERROR)

    async def console_revoke(self, event) -> None:
        """``consoles.console_revoke``: close this session if it is for us (or everyone).

        Never awaits: the listener goes straight back to ``receive()``, where the
        teardown cancels it (which also unsubscribes its channel).
        """
        user_id = event.get("user_id")
        if user_id is not None and user_id != self.user_id:
            return
        reason = str(event.get("reason") or "revoked")[:80]
        if not self._accepted:
            self._revoked = reason
            return
        self._close(f"revoked: {reason}", code=CLOSE_REVOKED, browser_reason=reason)

    # -- closing, exactly once ---------------------------------------------------------

    async def websocket_disconnect(self, message) -> None:
        await asyncio.shield(self._close("browser closed", code=None))

    def _close(self, reason: str, *, code: int | None, browser_reason: str = "") -> asyncio.Future:
        """Start the teardown (once; later calls get the same one) and return it.

        ``code`` is the websocket close code to send, ``None`` when the browser is gone.
        """
        if self._closing is None:
            self.close_reason = reason
            self._closing = asyncio.ensure_future(self._teardown(code, browser_reason))
        return self._closing

    async def _teardown(self, code: int | None, browser_reason: str) -> None:
        # 1. Stop the pumps, the timer and the channel listener.
        tasks = [t for t in (self._reader_task, self._watch_task, self._listen_task) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # 2. Tell the browser first: a revocation closes within the second.
        if code is not None:
            await self._send_close(code, browser_reason)
        # 3. The VNC connection.
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
            except (OSError, TimeoutError):
                self._writer.transport.abort()  # a VM that stopped reading
        # 4. The revocation group.
        if self._grouped:
            try:
                await self.channel_layer.group_discard(
                    consoles.vm_group(self.vm_id), self.channel_name
                )
            except Exception:
                log.exception("console session %s: group_discard failed", self._session_id)
        # 5. The audit row.
        if self._session_id is not None:
            try:
                await aconsole_session_end(
                    session_id=self._session_id,
                    bytes_to_vm=self.bytes_to_vm,
                    bytes_from_vm=self.bytes_from_vm,
                    close_reason=self.close_reason,
                )
            except Exception:
                log.exception("console session %s: audit row not closed", self._session_id)
            log.info(
                "console session %s closed: %s (%d bytes to vm %s, %d from it)",
                self._session_id,
                self.close_reason,
                self.bytes_to_vm,
                self.vm_id,
                self.bytes_from_vm,
            )

    async def _send_close(self, code: int, reason: str) -> None:
        if self._accepted:
            message = {"type": "websocket.close", "code": code}
            if reason:
                message["reason"] = reason.encode()[:120].decode(errors="ignore")
        else:
            message = {"type": "websocket.close"}  # every refusal looks the same
        try:
            await self.base_send(message)
        except Exception:  # the browser may already be gone
            log.debug("console: close not delivered", exc_info=True)


# --- live events ---------------------------------------------------------------------------


class EventsConsumer(AsyncWebsocketConsumer):
    """``/ws/events/``: the live events of one signed-in user's pages (docs/live-updates.md).

    Listens on the user's own channel, the channels of the groups they are a member of and
    of the courses they staff (``events.channels_for``), and forwards each event's payload
    to the browser as one JSON text frame. Anonymous connections are refused before
    ``accept()``. The browser has nothing to say here: a frame over a few bytes closes the
    connection. When the user's access changes (``events.event_access_changed``), the
    subscriptions are computed again and the page is told to refresh.
    """

    MAX_CLIENT_FRAME = 16  # bytes; room for a "ping", nothing more

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user_id: int | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept(): the handshake is refused (HTTP 403)
            return
        self.user_id = user.pk
        if not await self._subscribe():
            await self.close()
            return
        await self.accept()

    async def _subscribe(self) -> bool:
        """Join the channels the user may listen on now, leave the others; False when the
        account is gone or disabled."""
        wanted = await self._channels()
        if not wanted:
            return False
        for name in set(self.groups) - wanted:
            await self.channel_layer.group_discard(name, self.channel_name)
        for name in wanted - set(self.groups):
            await self.channel_layer.group_add(name, self.channel_name)
        self.groups = sorted(wanted)  # AsyncWebsocketConsumer leaves these on disconnect
        return True

    @database_sync_to_async
    def _channels(self) -> set[str]:
        user = get_user_model().objects.filter(pk=self.user_id).first()
        return events.channels_for(user=user) if user is not None else set()

    async def receive(self, text_data=None, bytes_data=None) -> None:
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > self.MAX_CLIENT_FRAME:
            await self.close(code=CLOSE_TOO_BIG)

    async def events_message(self, event) -> None:
        """``events._publish``: forward the payload if it is still for this user."""
        payload = event.get("payload")
        if not isinstance(payload, dict):
            return
        # The channel layer routes by subscription; this also drops what was already on
        # its way when an access change removed the subscription.
        if (
            events.group_channel(payload.get("group")) not in self.groups
            and events.course_channel(payload.get("course")) not in self.groups
        ):
            return
        await self.send(text_data=json.dumps(payload))

    async def events_access(self, event) -> None:
        """``events.event_access_changed``: listen where the user may listen now."""
        if not await self._subscribe():
            await self.close(code=CLOSE_REVOKED)
            return
        await self.send(text_data=json.dumps({"type": "access"}))
