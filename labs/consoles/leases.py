"""How many console and events sockets a user has open, capped (CONSOLE_MAX_PER_USER,
EVENTS_MAX_PER_USER).

Each open socket holds a *lease* in Redis: a member of the sorted set
``<layer prefix>:sockets:<kind>:<user id>`` scored by when it expires. A socket takes
its lease before ``accept()`` (one Lua script: drop expired leases, count, add if under
the cap, so two tabs opening at once cannot both squeeze past it), renews it every
``RENEW_SECONDS`` while it runs, and drops it when it closes. A process that crashes
drops nothing, and its leases expire ``LEASE_SECONDS`` later: a user is never locked out
by a socket that no longer exists for longer than that.

Both console transports (the Channels consumer and the websockify proxy) and the events
consumer count here, so a user's consoles are counted together wherever they run. The
keys carry the channel layer's prefix, which separates deployments (and test runs) that
share one Redis.
"""

import asyncio
import logging
import secrets
import time

import redis
import redis.asyncio
from django.conf import settings

from labs.errors import Unavailable

log = logging.getLogger(__name__)

CONSOLE = "console"
EVENTS = "events"
LEASE_SECONDS = 60
RENEW_SECONDS = 20

_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_RENEW = """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


def cap_of(kind: str) -> int:
    return settings.CONSOLE_MAX_PER_USER if kind == CONSOLE else settings.EVENTS_MAX_PER_USER


def _key(kind: str, user_id: int) -> str:
    prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "stratus")
    return f"{prefix}:sockets:{kind}:{user_id}"


def _take_args(kind: str, user_id: int) -> tuple[list[str], list, str]:
    lease = secrets.token_hex(8)
    now = time.time()
    args = [now, now + LEASE_SECONDS, lease, cap_of(kind), LEASE_SECONDS + 5]
    return [_key(kind, user_id)], args, lease


def _renew_args(kind: str, user_id: int, lease: str) -> tuple[list[str], list]:
    return [_key(kind, user_id)], [time.time() + LEASE_SECONDS, lease, LEASE_SECONDS + 5]


# --- synchronous (the websockify proxy, the ticket view) ----------------------------------


def leases_held(*, kind: str, user_id: int) -> int:
    """How many live sockets of this kind the user holds now."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return client.zcount(_key(kind, user_id), time.time(), "+inf")
    finally:
        client.close()


def console_cap_message(*, user_id: int) -> str | None:
    """What the console page says when the user may open no more consoles, else None
    (the transports refuse beyond the cap anyway; this is the readable half)."""
    cap = cap_of(CONSOLE)
    try:
        held = leases_held(kind=CONSOLE, user_id=user_id)
    except redis.RedisError as error:
        raise tickets_unavailable() from error
    if held < cap:
        return None
    return f"You have {cap} consoles open, the most one person may have: close one first."


def lease_take(*, kind: str, user_id: int) -> str | None:
    """A lease for one more socket of this user, or None at the cap."""
    keys, args, lease = _take_args(kind, user_id)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return lease if client.eval(_TAKE, len(keys), *keys, *args) else None
    finally:
        client.close()


def lease_renew(*, kind: str, user_id: int, lease: str) -> None:
    keys, args = _renew_args(kind, user_id, lease)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.eval(_RENEW, len(keys), *keys, *args)
    except redis.RedisError as error:  # the lease lives on until it expires
        log.warning("socket lease not renewed (%s)", type(error).__name__)
    finally:
        client.close()


def lease_drop(*, kind: str, user_id: int, lease: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.zrem(_key(kind, user_id), lease)
    except redis.RedisError as error:  # it expires by itself
        log.warning("socket lease not dropped (%s)", type(error).__name__)
    finally:
        client.close()


# --- asynchronous (the Channels consumers) ------------------------------------------------


async def alease_take(*, kind: str, user_id: int) -> str | None:
    keys, args, lease = _take_args(kind, user_id)
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        return lease if await client.eval(_TAKE, len(keys), *keys, *args) else None
    finally:
        await client.aclose()


async def alease_renew(*, kind: str, user_id: int, lease: str) -> None:
    keys, args = _renew_args(kind, user_id, lease)
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        await client.eval(_RENEW, len(keys), *keys, *args)
    except redis.RedisError as error:
        log.warning("socket lease not renewed (%s)", type(error).__name__)
    finally:
        await client.aclose()


async def alease_drop(*, kind: str, user_id: int, lease: str) -> None:
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        await client.zrem(_key(kind, user_id), lease)
    except redis.RedisError as error:
        log.warning("socket lease not dropped (%s)", type(error).__name__)
    finally:
        await client.aclose()


async def alease_keep(*, kind: str, user_id: int, lease: str) -> None:
    """Renew the lease every RENEW_SECONDS until cancelled (a task of the socket)."""
    while True:
        await asyncio.sleep(RENEW_SECONDS)
        await alease_renew(kind=kind, user_id=user_id, lease=lease)


def tickets_unavailable() -> Unavailable:
    return Unavailable(
        "The console cannot open right now: its ticket service is not answering. "
        "Try again in a minute."
    )
