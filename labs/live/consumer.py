"""``/ws/events/``: the live events of one signed-in user's pages (docs/live-updates.md)."""

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth import get_user_model

from labs.consoles.rules import CloseCode
from labs.live import events


class EventsConsumer(AsyncWebsocketConsumer):
    """``/ws/events/``: the live events of one signed-in user's pages (docs/live-updates.md).

    Listens on the user's own channel, the channels of the groups they are a member of and
    of the courses they staff (``events.channels_for``), and forwards each event's payload
    to the browser as one JSON text frame. Anonymous connections are refused before
    ``accept()``. The browser has nothing to say here: a frame over a few bytes closes the
    connection. When the user's access changes (``events.access_changed``), the
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
        await self.send(text_data=json.dumps(payload))

    async def events_access(self, event) -> None:
        """``events.access_changed``: listen where the user may listen now."""
        if not await self._subscribe():
            await self.close(code=CloseCode.REVOKED)
            return
        await self.send(text_data=json.dumps({"type": "access"}))
