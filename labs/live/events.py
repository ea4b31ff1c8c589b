"""Live events: tell the browsers that may see a change that it happened.

Services call ``<thing>_changed`` inside their transaction; the event is published after commit
(``transaction.on_commit``), so a rolled-back change is never announced, and it is built
from the row as it is then, so it always says what the page will show. An event goes to
Channels' layer (Redis) groups:

- ``events.group.<group_id>``: the group's members,
- ``events.course.<course_id>``: the course's staff (and superusers),
- ``events.user.<user_id>``: one user's own connections (``access_changed``).

``labs.live.consumer.EventsConsumer`` forwards the ``payload`` of each message to the
browser as JSON, and ``static/js/live.js`` refreshes the page's live regions. A payload
carries only what the group page shows (docs/live-updates.md): never keys, tickets, VNC
endpoints, hosts' URIs, worker names or anything of another group.

Publishing never fails the caller: with Redis down, an operation still runs and a request
still answers; the event is dropped with a warning, and every page refreshes itself when
its websocket comes back.

Each event also marks its group and course as changed. Within ``LIVE_COALESCE_MS`` the
changes of the process are gathered and then rendered once per audience by the renderer
that ``labs.apps`` registers (``labs.live.regions.render``: the group pages' members and
staff renderings, the overview), and the HTML is pushed on the same channels
(``regions_flush``). Only channels someone listens on are rendered for.
"""

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections, transaction

from labs import access
from labs.live import pagecache
from labs.models import Group, Membership, Operation, Vm

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0  # seconds: a Redis that does not answer must not hold up a worker
EVENT_MESSAGE = "events.message"  # EventsConsumer.events_message forwards its payload
ACCESS_MESSAGE = "events.access"  # EventsConsumer.events_access recomputes subscriptions


def group_channel(group_id: int) -> str:
    return f"events.group.{group_id}"


def course_channel(course_id: int) -> str:
    return f"events.course.{course_id}"


def user_channel(user_id: int) -> str:
    return f"events.user.{user_id}"


def staff_page_channel(group_id: int) -> str:
    """The group page's staff rendering: the course's staff with that page open."""
    return f"events.group.{group_id}.staff"


# --- what services call ----------------------------------------------------------------------


def operation_changed(*, operation: Operation) -> None:
    """An Operation was created or changed (queued, running, progress, succeeded, failed)."""
    operation_id = operation.pk
    pagecache.vm_changed(vm_id=operation.vm_id)
    _after_commit(lambda: _publish_payload(operation_payload(operation_id=operation_id)))


def vm_changed(*, vm: Vm) -> None:
    """A VM was created, placed or deleted, or its observed state changed."""
    vm_id = vm.pk
    pagecache.vm_changed(vm_id=vm_id)
    _after_commit(lambda: _publish_payload(vm_payload(vm_id=vm_id)))


def group_changed(*, group: Group) -> None:
    """A group changed: its status, its members, its project."""
    group_id = group.pk
    pagecache.group_changed(group_id=group_id, course_id=group.course_id)
    _after_commit(lambda: _publish_payload(group_payload(group_id=group_id)))


def access_changed(*, user_id: int) -> None:
    """What the user may see changed (joined or left a group, became staff): the user's
    open connections re-compute their subscriptions and their pages refresh."""
    _after_commit(lambda: layer_publish([(user_channel(user_id), {"type": ACCESS_MESSAGE})]))


def access_recheck(*, user_id: int, session_hash: str = "") -> None:
    """Now (call it after commit): the user's connections check the account and their
    session again and re-subscribe; those of the session named by ``session_hash``
    close (``labs.people.revocation``: a sign-out)."""
    message = {"type": ACCESS_MESSAGE}
    if session_hash:
        message["session_hash"] = session_hash
    layer_publish([(user_channel(user_id), message)])


# --- who listens where ---------------------------------------------------------------------------


def channels_for(*, user: AbstractBaseUser, page_group: int | None = None) -> set[str]:
    """The channel-layer groups one user's connections listen on: their own, the groups
    they are a member of, and the courses they staff (every course for a superuser); and
    for a connection of a group's page (``page_group``) whose course they staff, that
    page's staff rendering."""
    if not user.is_authenticated or not user.is_active:
        return set()
    staff_page = set()
    if page_group is not None:
        group = Group.objects.filter(pk=page_group).only("course_id").first()
        if group is not None and access.is_course_staff(user=user, course=group.course_id):
            staff_page = {staff_page_channel(group.pk)}
    groups = Membership.objects.filter(user=user, group__isnull=False).values_list(
        "group_id", flat=True
    )
    courses = access.courses_staffed_by(user=user, action=access.Action.VIEW).values_list(
        "pk", flat=True
    )
    return {
        user_channel(user.pk),
        *(group_channel(group_id) for group_id in groups),
        *(course_channel(course_id) for course_id in courses),
        *staff_page,
    }


# --- payloads: exactly what the page shows ---------------------------------------------------


def operation_payload(*, operation_id: int) -> dict[str, Any] | None:
    op = Operation.objects.select_related("vm__group", "vm__host").filter(pk=operation_id).first()
    if op is None:
        return None
    vm = op.vm
    return {
        "type": "operation",
        "group": vm.group_id,
        "course": vm.group.course_id,
        "group_name": vm.group.name,
        "vm": vm.pk,
        "vm_name": vm.name,
        "operation": op.pk,
        "kind": op.kind,
        "kind_display": op.get_kind_display(),
        "status": op.status,
        "status_display": op.get_status_display(),
        "progress": op.progress,
        "error": without_host_uri(op.error, vm),
    }


def vm_payload(*, vm_id: int) -> dict[str, Any] | None:
    vm = Vm.objects.select_related("group", "host").filter(pk=vm_id).first()
    if vm is None:
        return None
    return {
        "type": "vm",
        "group": vm.group_id,
        "course": vm.group.course_id,
        "group_name": vm.group.name,
        "vm": vm.pk,
        "vm_name": vm.name,
        "state": vm.observed_state,
        "state_display": vm.get_observed_state_display(),
        "message": without_host_uri(vm.status_message, vm),
    }


def group_payload(*, group_id: int) -> dict[str, Any] | None:
    group = Group.objects.filter(pk=group_id).first()
    if group is None:
        return None
    return {
        "type": "group",
        "group": group.pk,
        "course": group.course_id,
        "status": group.status,
        "status_display": group.get_status_display(),
    }


def without_host_uri(text: str, vm: Vm) -> str:
    """Hypervisor errors may name the host's libvirt URI; students see the host's name."""
    host = vm.host
    if text and host is not None and host.uri:
        return text.replace(host.uri, host.name)
    return text


# --- publishing ---------------------------------------------------------------------------------


def _after_commit(publish) -> None:
    transaction.on_commit(publish, robust=True)


def _publish_payload(payload: dict[str, Any] | None) -> None:
    if payload is None:  # the row is gone (deleted in the admin): nothing to show
        return
    message = {"type": EVENT_MESSAGE, "payload": payload}
    pagecache.group_changed(group_id=payload["group"], course_id=payload["course"])
    layer_publish(
        [(group_channel(payload["group"]), message), (course_channel(payload["course"]), message)]
    )
    regions_changed(group_id=payload["group"], course_id=payload["course"])


# --- pushing the rendered regions ---------------------------------------------------------------

# The audiences of a group page: its members (on the group's channel) and the course's
# staff who have it open (on ``staff_page_channel``).
MEMBERS = "members"
STAFF = "staff"

# (groups={group_id: [audience, …]}, course_ids={…}) -> [(channel kind, id, payload)], the
# kind "group", "staff-page" or "course"; labs.apps sets it.
Renderer = Callable[..., list[tuple[str, int, dict[str, Any]]]]
_renderer: Renderer | None = None


def regions_renderer(render: Renderer | None) -> None:
    """Who renders the regions of changed groups and courses (``labs.live.regions.render``,
    registered by ``labs.apps``: it reads through services that publish here)."""
    global _renderer
    _renderer = render


class _Changed:
    """The groups and courses changed since the last push, in this process, and the one
    flush at a time that pushes them (``timer``: one is waiting; ``flushing``: one runs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.groups: dict[int, int] = {}  # group -> its course
        self.courses: set[int] = set()
        self.timer: threading.Timer | None = None
        self.flushing = False

    def take(self) -> tuple[dict[int, int], set[int]]:
        with self.lock:
            groups, courses = self.groups, self.courses
            self.groups, self.courses, self.timer = {}, set(), None
        return groups, courses

    def schedule(self, window: float) -> None:
        """Start the window's timer unless one waits or a flush runs (call with the lock)."""
        if self.timer is None and not self.flushing and (self.groups or self.courses):
            self.timer = threading.Timer(window, _flush_in_thread)
            self.timer.daemon = True
            self.timer.start()

    def idle(self) -> bool:
        with self.lock:
            return self.timer is None and not self.flushing and not (self.groups or self.courses)


_changed = _Changed()


def regions_changed(*, group_id: int | None, course_id: int) -> None:
    """Render and push the regions of this group (its page) and course (the overview)
    once the coalescing window has passed: a burst of changes renders each once. One
    flush runs at a time; what changes meanwhile waits for the next (under load the
    windows grow instead of the renderings piling up). With ``LIVE_COALESCE_MS`` 0 (the
    tests) it renders now."""
    if _renderer is None:
        return
    window = settings.LIVE_COALESCE_MS / 1000
    with _changed.lock:
        if group_id is not None:
            _changed.groups[group_id] = course_id
        _changed.courses.add(course_id)
        if window > 0:
            _changed.schedule(window)
            return
    regions_flush()


def regions_idle() -> bool:
    """Nothing waits to be pushed and no flush runs (bench/live.py waits for it)."""
    return _changed.idle()


def _flush_in_thread() -> None:
    with _changed.lock:
        _changed.flushing = True
    try:
        regions_flush()
    finally:
        connections.close_all()  # this thread's own connections
        with _changed.lock:
            _changed.flushing = False
            _changed.schedule(settings.LIVE_COALESCE_MS / 1000)


def regions_flush() -> int:
    """Render what changed for the channels someone listens on and push it; the number
    of pushes. Never raises: a page that misses a push catches up when it reconnects."""
    groups, courses = _changed.take()
    if _renderer is None or not (groups or courses):
        return 0
    heard = listened(
        [group_channel(g) for g in groups]
        + [staff_page_channel(g) for g in groups]
        + [course_channel(c) for c in courses]
    )
    if heard is None:  # Redis is away: nothing could be pushed
        return 0

    def heard_on(channel: str) -> bool:
        return heard.get(channel, True)

    audiences = {
        group_id: [
            audience
            for audience, channel in (
                (MEMBERS, group_channel(group_id)),
                (STAFF, staff_page_channel(group_id)),
            )
            if heard_on(channel)
        ]
        for group_id in groups
    }
    audiences = {group_id: wanted for group_id, wanted in audiences.items() if wanted}
    overviews = {course_id for course_id in courses if heard_on(course_channel(course_id))}
    if not (audiences or overviews):
        return 0
    try:
        pushes = _renderer(groups=audiences, course_ids=overviews)
    except Exception:
        log.exception("live regions not rendered (groups %s, courses %s)", groups, courses)
        return 0
    channel_of = {
        "group": group_channel,
        "staff-page": staff_page_channel,
        "course": course_channel,
    }
    messages = [
        (channel_of[kind](target), {"type": EVENT_MESSAGE, "payload": payload})
        for kind, target, payload in pushes
    ]
    layer_publish(messages)
    return len(messages)


def listened(channels: list[str]) -> dict[str, bool] | None:
    """Whether any connection listens on each of these channel-layer groups (Redis
    PUBSUB NUMSUB), so that no page is rendered for no one. Unknown (another layer): not
    in the answer, which callers read as "maybe"; None when Redis does not answer."""
    layer = get_channel_layer()
    if layer is None or not channels or not hasattr(layer, "_get_layer"):
        return {}
    try:
        return _sync_call(_numsub, layer, channels)
    except Exception as error:
        log.warning("live regions not pushed: Redis did not answer (%s)", type(error).__name__)
        return None


async def _numsub(layer, channels: list[str]) -> dict[str, bool]:
    """channels_redis' pubsub layer keeps a group's subscribers on one shard's channel."""
    inner = layer._get_layer()
    heard = {}
    async with asyncio.timeout(PUBLISH_TIMEOUT):
        for name in channels:
            redis_channel = inner._get_group_channel_name(name)
            shard = inner._get_shard(redis_channel)
            shard._ensure_redis()
            ((_, count),) = await shard._redis.pubsub_numsub(redis_channel)
            heard[name] = count > 0
    return heard


def _sync_call(function, *args):
    """Run an async function of the layer from sync code (see ``layer_publish``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return async_to_sync(function)(*args)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(async_to_sync(function), *args).result()


def layer_publish(messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Send to channel-layer groups from sync code (views, Celery workers, commands).

    Never raises (console revocation sends through it too). From a plain thread,
    ``async_to_sync`` runs the sends in a fresh event loop whose closing closes the
    layer's Redis connection for that loop (RedisPubSubChannelLayer keeps one connection
    per loop), so a worker publishing
    thousands of events keeps no connection open. Under the ASGI server (a sync view),
    ``async_to_sync`` runs them on the server's loop and its one connection.
    """
    layer = get_channel_layer()
    if layer is None or not messages:
        return
    try:
        # Sync code called straight from async code (no sync_to_async), e.g. a script or
        # test that drives a browser: async_to_sync refuses a thread with a running loop,
        # so _sync_call publishes from a short-lived thread then.
        _sync_call(_send, layer, messages)
    except Exception as error:  # Redis down or slow: the change itself still stands
        log.warning(
            "live event not published to %s (%s); pages catch up when they reconnect",
            ", ".join(group for group, _ in messages),
            type(error).__name__,
        )


async def _send(layer, messages: list[tuple[str, dict[str, Any]]]) -> None:
    async with asyncio.timeout(PUBLISH_TIMEOUT):
        for group, message in messages:
            await layer.group_send(group, message)
