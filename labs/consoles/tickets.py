"""Console tickets and revocation.

A ticket is 256 random bits handed to one browser for one websocket connection. Redis
holds only its SHA-256 (with the user, the VM, the session and the mode it was issued
for) for CONSOLE_TICKET_TTL seconds, and a transport takes it with an atomic GETDEL:
a ticket works once, for its user, its VM and its browser session, and never shows up in
a log line or a URL (it travels in the websocket subprotocol ``stratus.ticket.<token>``).

Revocation: every live console of a VM listens on the channel-layer group
``console.vm.<id>``; ``console_revoke`` closes them (all, or one user's) within a second.
"""

import hashlib
import json
import re
import secrets
from dataclasses import dataclass

import redis
import redis.asyncio
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from labs.errors import Unavailable
from labs.live.events import layer_publish
from labs.models import Vm

TICKET_PREFIX = "stratus:console-ticket:"
# The websocket subprotocol that carries the ticket: "stratus.ticket.<token>"
SUBPROTOCOL_PREFIX = "stratus.ticket."
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,100}")


@dataclass(frozen=True)
class Ticket:
    user_id: int
    vm_id: int
    session_hash: str
    view_only: bool


def _key(token: str) -> str:
    return TICKET_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def session_hash(session_key: str | None) -> str:
    """Bind tickets to the browser session without storing the session key itself."""
    return hashlib.sha256((session_key or "").encode()).hexdigest()


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def ticket_issue(
    *, user: AbstractBaseUser, vm: Vm, session_key: str | None, view_only: bool
) -> str:
    """A fresh single-use ticket for this user, VM and browser session; returns the token."""
    token = secrets.token_urlsafe(32)  # 256 bits
    payload = json.dumps(
        {
            "user_id": user.pk,
            "vm_id": vm.pk,
            "session_hash": session_hash(session_key),
            "view_only": view_only,
        }
    )
    try:
        _redis().set(_key(token), payload, ex=settings.CONSOLE_TICKET_TTL)
    except redis.RedisError as error:
        raise Unavailable(
            "The console cannot open right now: its ticket service is not answering. "
            "Try again in a minute."
        ) from error
    return token


def _ticket(raw: bytes | None) -> Ticket | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return Ticket(
        user_id=int(data["user_id"]),
        vm_id=int(data["vm_id"]),
        session_hash=str(data["session_hash"]),
        view_only=bool(data["view_only"]),
    )


def _usable(token: str) -> bool:
    """Whether ``token`` can be a ticket at all (never look up anything else)."""
    return bool(TOKEN_RE.fullmatch(token or ""))


async def aticket_consume(*, token: str) -> Ticket | None:
    """Take a ticket (atomic GETDEL): the first caller gets it, every later one None."""
    if not _usable(token):
        return None
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        return _ticket(await client.getdel(_key(token)))
    finally:
        await client.aclose()


def ticket_consume(*, token: str) -> Ticket | None:
    """``aticket_consume`` for synchronous code (the websockify transport): same keys, so
    a ticket works exactly once, whichever transport takes it first."""
    if not _usable(token):
        return None
    client = _redis()
    try:
        return _ticket(client.getdel(_key(token)))
    finally:
        client.close()


def vm_group(vm_id: int) -> str:
    return f"console.vm.{vm_id}"


def console_revoke(*, vm_id: int, reason: str, user_id: int | None = None) -> None:
    """Close every live console of a VM (or only one user's) within a second."""
    # Through the events' sender: it never raises (Redis down must not fail a stop or a
    # delete, whose VM then drops its VNC connection by itself) and works from any thread.
    layer_publish(
        [(vm_group(vm_id), {"type": "console.revoke", "reason": reason, "user_id": user_id})]
    )
