"""``/ws/events/``: the live events of one signed-in user's pages (docs/live-updates.md)."""

import asyncio
import contextlib
import json
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth import get_user_model

from labs.consoles import leases
from labs.consoles.rules import CloseCode
from labs.consoles.sessions import session_hash, session_signed_in
from labs.live import events


class EventsConsumer(AsyncWebsocketConsumer):
    """``/ws/events/``: the live events of one signed-in user's pages (docs/live-updates.md).

    Listens on the user's own channel, the channels of the groups they are a member of and
    of the courses they staff (``events.channels_for``) — with ``?group=<id>`` (a group
    page's socket) of a group whose course they staff, also that page's staff rendering
    (``events.staff_page_channel``) — and forwards each event's payload
    to the browser as one JSON text frame. Anonymous connections are refused before
    ``accept()``. The browser has nothing to say here: a frame over a few bytes closes the
    connection. When the user's access changes (``events.access_changed``), the
    subscriptions are computed again and the page is told to refresh; when the account
    or the browser session is no longer signed in (deactivated, password changed, signed
    out: ``labs.people.revocation``), the socket closes with ``CloseCode.REVOKED``. A user
    holds at most EVENTS_MAX_PER_USER of these at once (``labs.consoles.leases``).
    """

    MAX_CLIENT_FRAME = 16  # bytes; room for a "ping", nothing more

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user_id: int | None = None
        self._lease: str | None = None
        self._lease_task: asyncio.Task | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept(): the handshake is refused (HTTP 403)
            return
        self.user_id = user.pk
        if not await self._lease_take():
            await self.close()  # over EVENTS_MAX_PER_USER: refused like the rest
            return
        if not await self._subscribe():
            await self._lease_release()
            await self.close()
            return
        await self.accept()

    async def _lease_take(self) -> bool:
        self._lease = await leases.alease_take(kind=leases.EVENTS, user_id=self.user_id)
        if self._lease is None:
            return False
        self._lease_task = asyncio.create_task(
            leases.alease_keep(kind=leases.EVENTS, user_id=self.user_id, lease=self._lease)
        )
        return True

    async def disconnect(self, code) -> None:
        await self._lease_release()

    async def _lease_release(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        if self._lease is not None:
            lease, self._lease = self._lease, None
            await leases.alease_drop(kind=leases.EVENTS, user_id=self.user_id, lease=lease)

    def _session_key(self) -> str | None:
        session = self.scope.get("session")
        return session.session_key if session is not None else None

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
        """Where the user may listen now; nothing once the session is signed out (a
        password change or reset ends it too)."""
        if not session_signed_in(session_key=self._session_key(), user_id=self.user_id):
            return set()
        user = get_user_model().objects.filter(pk=self.user_id).first()
        if user is None:
            return set()
        return events.channels_for(user=user, page_group=self._page_group())

    def _page_group(self) -> int | None:
        """``?group=<id>``: the socket is a group page's (live.js says so)."""
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        value = (query.get("group") or [""])[0]
        return int(value) if value.isdigit() else None

    async def receive(self, text_data=None, bytes_data=None) -> None:
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > self.MAX_CLIENT_FRAME:
            await self.close(code=CloseCode.TOO_BIG)

    async def events_message(self, event) -> None:
        """``events.layer_publish`` of an event: forward the payload if it is still for this
        user."""
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
        # A rendering for the course's staff only ever reaches a staff connection: of that
        # group's page, or (the overview's) of the course.
        if payload.get("audience") == events.STAFF:
            wanted = (
                events.staff_page_channel(payload.get("group"))
                if payload.get("page") == "group"
                else events.course_channel(payload.get("course"))
            )
            if wanted not in self.groups:
                return
        await self.send(text_data=json.dumps(payload))

    async def events_access(self, event) -> None:
        """``events.access_changed``: listen where the user may listen now.
        (``events.access_recheck`` naming this session: it signed out.)"""
        ended = event.get("session_hash")
        if ended and ended == session_hash(self._session_key()):
            await self.close(code=CloseCode.REVOKED)
            return
        if not await self._subscribe():
            await self.close(code=CloseCode.REVOKED)
            return
        await self.send(text_data=json.dumps({"type": "access"}))
