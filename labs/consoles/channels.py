"""The console's Channels transport: noVNC in the browser <-> the VM's VNC server.

See docs/console.md for the security design. In short: every check happens before
``accept()`` (the rules are ``labs.consoles.rules``, shared with the websockify
transport), and every refusal is the same bare close (the reason goes to the server log,
without the ticket); after ``accept()`` the consumer is a byte pump with one reader task,
backpressure, time limits, revocation and one audit row per session.
"""

import asyncio
import logging
import time

from channels.consumer import AsyncConsumer
from channels.layers import get_channel_layer

from labs.consoles import leases, rules, tickets, tunnel
from labs.consoles.rfb import (
    ClientStreamFilter,
    RfbProtocolError,
    ServerStreamWatcher,
    WrongDesktop,
)
from labs.consoles.rules import CloseCode, ConsoleDenied
from labs.consoles.sessions import asession_signed_in, session_hash

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024  # bytes read from the VNC server per websocket message
CONNECT_TIMEOUT = 5.0  # seconds to reach the VNC server
CLOSE_TIMEOUT = 1.0  # seconds to wait for the VNC connection to close before aborting it


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
        self._server_watch = ServerStreamWatcher(expected_name="")
        self._host_name = ""  # the host the VNC connection went to
        self._filter: ClientStreamFilter | None = None
        self._limits = rules.Limits(max_frame=0, idle_timeout=0.0, max_session=0.0)
        self._started = 0.0
        self._last_input = 0.0
        self._listen_task: asyncio.Task | None = None
        self._reader_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._closing: asyncio.Future | None = None
        # Revocation by user (labs.people.revocation) and the per-user cap.
        self._session_key: str | None = None
        self._user_grouped = False
        self._recheck_pending: str | None = None
        self._recheck_task: asyncio.Task | None = None
        self._lease: str | None = None
        self._lease_task: asyncio.Task | None = None

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
        except ConsoleDenied as refused:
            self._log_refusal(str(refused))
            await self._close("refused", code=CloseCode.NORMAL)
            return
        except Exception:
            log.exception("console: unexpected error while connecting (vm %s)", self.vm_id)
            self._log_refusal("server error")
            await self._close("refused", code=CloseCode.NORMAL)
            return
        await self.base_send({"type": "websocket.accept", "subprotocol": subprotocol})
        self._accepted = True
        self._started = self._last_input = time.monotonic()
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
                f"revoked: {self._revoked}", code=CloseCode.REVOKED, browser_reason=self._revoked
            )
        elif self._recheck_pending is not None:  # the user's access changed meanwhile
            self._recheck_start(self._recheck_pending)

    async def _authorise_and_open(self) -> str:
        """Run every check, open the VNC connection; return the subprotocol to accept."""
        self.vm_id = int(self.scope["url_route"]["kwargs"]["vm_id"])
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            self.user_id = user.pk
        # The ticket travels in the subprotocol, never in the URL (which gets logged).
        subprotocol, token = rules.token_from_protocols(self.scope.get("subprotocols") or [])
        # Take the ticket first: whatever happens next, it never works again.
        ticket = await tickets.aticket_consume(token=token)
        if ticket is not None and self.user_id is None:
            raise ConsoleDenied("not logged in")
        session = self.scope.get("session")
        session_key = session.session_key if session is not None else None
        if ticket is not None and not session_key:
            raise ConsoleDenied("no browser session")
        ticket = rules.ticket_binding_check(
            ticket, user_id=self.user_id, session_key=session_key, vm_id=self.vm_id
        )
        self.view_only = ticket.view_only
        self._session_key = session_key
        if self.channel_layer is None:
            raise ConsoleDenied("no channel layer: revocation would not work")
        await self._lease_take()
        # Join the revocation group before reading the VM's state, so a revocation sent
        # after that state changed is never missed (it waits in our channel's queue).
        self.channel_name = await self.channel_layer.new_channel()
        self._listen_task = asyncio.create_task(self._listen())
        await self.channel_layer.group_add(tickets.vm_group(self.vm_id), self.channel_name)
        self._grouped = True
        await self._user_group_join()
        target = await rules.atarget_for(
            user_id=self.user_id, vm_id=self.vm_id, view_only=self.view_only
        )
        if self._revoked is not None:
            raise ConsoleDenied(f"revoked while connecting: {self._revoked}")
        await self._session_check()
        self._limits = rules.Limits.now()
        self._server_watch = ServerStreamWatcher(expected_name=target.desktop_name)
        self._host_name = target.host_name
        if self.view_only:
            self._filter = ClientStreamFilter(drop_input=True)
        endpoint = target.endpoint
        try:
            if endpoint.ssh is not None:
                opening = tunnel.open_unix(endpoint.ssh, endpoint.socket)
            elif endpoint.socket:
                opening = asyncio.open_unix_connection(endpoint.socket)
            else:
                opening = asyncio.open_connection(endpoint.host, endpoint.port)
            self._reader, self._writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise ConsoleDenied(f"VNC server unreachable ({type(error).__name__})") from None
        self._session_id = await rules.asession_start(
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
            self._close("text frame", code=CloseCode.UNSUPPORTED)
            return
        if len(data) > self._limits.max_frame:
            self._close("frame too large", code=CloseCode.TOO_BIG)
            return
        self._last_input = time.monotonic()
        self._server_watch.client_feed(data)
        if self._filter is not None:
            try:
                data = self._filter.feed(data)
            except RfbProtocolError as error:
                self._close(f"protocol error: {error}", code=CloseCode.PROTOCOL_ERROR)
                return
        if not data:
            return
        writer = self._writer
        try:
            writer.write(data)
            self.bytes_to_vm += len(data)
            await writer.drain()  # backpressure: stop reading the browser while VNC lags
        except OSError:
            self._close("VNC connection lost", code=CloseCode.NORMAL)

    async def _pump_from_vnc(self) -> None:
        """VNC to browser: the one reader task."""
        reader, send = self._reader, self.base_send
        reason, code = "VNC closed", CloseCode.NORMAL
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                self.bytes_from_vm += len(data)
                data = self._server_watch.feed(data)  # nothing of another VM's screen
                if data:
                    await send({"type": "websocket.send", "bytes": data})
        except WrongDesktop as wrong:
            log.warning("console session %s closed: %s", self._session_id, wrong)
            reason, code = "not this VM's console", CloseCode.REVOKED
        except RfbProtocolError as error:
            reason, code = f"VNC server protocol error: {error}", CloseCode.SERVER_ERROR
        except OSError:  # includes the ASGI server's "client disconnected"
            reason = "connection lost"
        except Exception:
            log.exception("console session %s: reader failed", self._session_id)
            reason, code = "server error", CloseCode.SERVER_ERROR
        browser_reason = ""
        if code == CloseCode.NORMAL and self._closing is None:
            # The VNC server went away: a live move ends the source's QEMU at its switch.
            # The page connects again, to the VM on its new host.
            try:
                moved_to = await rules.amoved_to(vm_id=self.vm_id, host_name=self._host_name)
            except Exception:
                log.exception("console session %s: move check failed", self._session_id)
                moved_to = ""
            if moved_to:
                reason = browser_reason = f"moved to {moved_to}"
                code = CloseCode.MOVED
        self._close(reason, code=code, browser_reason=browser_reason)

    async def _watch(self) -> None:
        """Close the session at the limits (``rules.Limits``: idle, session length)."""
        while True:
            now = time.monotonic()
            over = self._limits.over(started=self._started, last_input=self._last_input, now=now)
            if over is not None:
                code, reason = over
                self._close(reason, code=code)
                return
            wake = self._limits.next_check(started=self._started, last_input=self._last_input)
            await asyncio.sleep(max(wake - now, 0.01))

    # -- revocation --------------------------------------------------------------------

    async def _listen(self) -> None:
        """Channel-layer messages, in their own task so they never wait behind a frame."""
        try:
            while True:
                event = await self.channel_layer.receive(self.channel_name)
                if event.get("type") == "console.revoke":
                    await self.console_revoke(event)
                elif event.get("type") == tickets.RECHECK_MESSAGE:
                    self.console_recheck(event)
        except Exception:
            # Without its revocation channel a session must not go on.
            log.exception("console session %s: channel layer failed", self._session_id)
            self._close("revocation channel lost", code=CloseCode.SERVER_ERROR)

    async def console_revoke(self, event) -> None:
        """``tickets.console_revoke``: close this session if it is for us (or everyone).

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
        self._close(f"revoked: {reason}", code=CloseCode.REVOKED, browser_reason=reason)

    # -- revocation by user: access ended, or the browser session signed out ---------

    async def _user_group_join(self) -> None:
        """Listen on ``console.user.<id>`` (``tickets.console_access_recheck``)."""
        await self.channel_layer.group_add(tickets.user_group(self.user_id), self.channel_name)
        self._user_grouped = True

    async def _user_group_leave(self) -> None:
        if not self._user_grouped:
            return
        self._user_grouped = False
        try:
            await self.channel_layer.group_discard(
                tickets.user_group(self.user_id), self.channel_name
            )
        except Exception:
            log.exception("console session %s: group_discard failed", self._session_id)

    async def _session_check(self) -> None:
        """The browser session still signed in, checked after joining ``console.user``:
        a sign-out or password change from here on reaches us as a message."""
        if not await asession_signed_in(session_key=self._session_key, user_id=self.user_id):
            raise ConsoleDenied("the browser session is no longer signed in")

    def console_recheck(self, event) -> None:
        """``tickets.console_access_recheck``: close at once if it names our browser
        session (a sign-out), else check access and session again (in a task: the
        listener goes straight back to ``receive()``)."""
        reason = str(event.get("reason") or "access ended")[:80]
        ended = event.get("session_hash")
        if ended and ended == session_hash(self._session_key):
            if not self._accepted:
                self._revoked = reason
                return
            self._close(f"revoked: {reason}", code=CloseCode.REVOKED, browser_reason=reason)
            return
        if not self._accepted:
            self._recheck_pending = reason  # checked again once accepted
            return
        self._recheck_start(reason)

    def _recheck_start(self, reason: str) -> None:
        if self._closing is None:
            self._recheck_task = asyncio.create_task(self._recheck(reason))

    async def _recheck(self, reason: str) -> None:
        try:
            await rules.atarget_for(
                user_id=self.user_id, vm_id=self.vm_id, view_only=self.view_only
            )
            allowed = await asession_signed_in(session_key=self._session_key, user_id=self.user_id)
        except ConsoleDenied:
            allowed = False
        except Exception:  # cannot tell: a console must not outlive the access it needs
            log.exception("console session %s: access re-check failed", self._session_id)
            allowed = False
        if not allowed:
            self._close(f"revoked: {reason}", code=CloseCode.REVOKED, browser_reason=reason)

    # -- the per-user cap (labs.consoles.leases) ---------------------------------------

    async def _lease_take(self) -> None:
        self._lease = await leases.alease_take(kind=leases.CONSOLE, user_id=self.user_id)
        if self._lease is None:
            raise ConsoleDenied("the user has CONSOLE_MAX_PER_USER consoles open")
        self._lease_task = asyncio.create_task(
            leases.alease_keep(kind=leases.CONSOLE, user_id=self.user_id, lease=self._lease)
        )

    async def _lease_drop(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            await leases.alease_drop(kind=leases.CONSOLE, user_id=self.user_id, lease=lease)

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
        tasks = [
            t
            for t in (self._reader_task, self._watch_task, self._listen_task, self._lease_task)
            if t
        ]
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
                    tickets.vm_group(self.vm_id), self.channel_name
                )
            except Exception:
                log.exception("console session %s: group_discard failed", self._session_id)
        await self._user_group_leave()
        await self._lease_drop()
        # 5. The audit row.
        if self._session_id is not None:
            try:
                await rules.asession_end(
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
