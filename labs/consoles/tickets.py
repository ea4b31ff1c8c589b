"""Console tickets and revocation.

A ticket is 256 random bits handed to one browser for one websocket connection. Redis
holds only its SHA-256 (with the user, the VM, the session and the mode it was issued
for) for CONSOLE_TICKET_TTL seconds, and a transport takes it with an atomic GETDEL:
a ticket works once, for its user, its VM and its browser session, and never shows up in
a log line or a URL (it travels in the websocket subprotocol ``stratus.ticket.<token>``).

Each stored ticket carries an HMAC (SECRET_KEY, with SECRET_KEY_FALLBACKS on the way in)
of its Redis key and its fields: whoever can write to Redis still cannot mint a ticket, which
matters most to a proxy run with ``--allow-without-session`` (no session cookie to bind to).

Revocation: every live console of a VM listens on the channel-layer group
``console.vm.<id>``; ``console_revoke`` closes them (all, or one user's) within a second.
Every console also listens on ``console.user.<id>``: ``console_access_recheck`` (sent by
``labs.people.revocation.access_ended``) makes each of the user's consoles check its access
and its browser session again, and close at once when either has ended.
"""

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass

import redis
import redis.asyncio
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils.crypto import constant_time_compare, salted_hmac

from labs.consoles.sessions import session_hash
from labs.errors import Unavailable
from labs.live.events import layer_publish
from labs.models import Vm

log = logging.getLogger(__name__)

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


MAC_SALT = "stratus.consoles.ticket"
_FIELDS = ("user_id", "vm_id", "session_hash", "view_only")


def _mac(key: str, fields: dict, secret: str) -> str:
    """The HMAC of a stored ticket: its Redis key (so a value cannot move to another
    token) and its fields, canonically encoded."""
    message = key + "\n" + json.dumps([fields[f] for f in _FIELDS], separators=(",", ":"))
    return salted_hmac(MAC_SALT, message, secret=secret, algorithm="sha256").hexdigest()


def _signed(key: str, data: dict) -> bool:
    given = data.get("mac")
    if not isinstance(given, str):
        return False
    secrets_ = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    return any(constant_time_compare(given, _mac(key, data, s)) for s in secrets_)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def ticket_issue(
    *, user: AbstractBaseUser, vm: Vm, session_key: str | None, view_only: bool
) -> str:
    """A fresh single-use ticket for this user, VM and browser session; returns the token."""
    token = secrets.token_urlsafe(32)  # 256 bits
    key = _key(token)
    fields = {
        "user_id": user.pk,
        "vm_id": vm.pk,
        "session_hash": session_hash(session_key),
        "view_only": view_only,
    }
    payload = json.dumps({**fields, "mac": _mac(key, fields, settings.SECRET_KEY)})
    try:
        _redis().set(key, payload, ex=settings.CONSOLE_TICKET_TTL)
    except redis.RedisError as error:
        raise Unavailable(
            "The console cannot open right now: its ticket service is not answering. "
            "Try again in a minute."
        ) from error
    return token


def _ticket(key: str, raw: bytes | None) -> Ticket | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        signed = isinstance(data, dict) and all(f in data for f in _FIELDS) and _signed(key, data)
    except ValueError:
        signed = False
    if not signed:
        # Not written by ticket_issue with our SECRET_KEY: someone wrote to Redis.
        log.warning("console ticket refused: its signature does not verify")
        return None
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
    key = _key(token)
    try:
        return _ticket(key, await client.getdel(key))
    finally:
        await client.aclose()


def ticket_consume(*, token: str) -> Ticket | None:
    """``aticket_consume`` for synchronous code (the websockify transport): same keys, so
    a ticket works exactly once, whichever transport takes it first."""
    if not _usable(token):
        return None
    client = _redis()
    key = _key(token)
    try:
        return _ticket(key, client.getdel(key))
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


def user_group(user_id: int) -> str:
    return f"console.user.{user_id}"


RECHECK_MESSAGE = "console.recheck"


def console_access_recheck(*, user_id: int, reason: str, session_hash: str = "") -> None:
    """Every live console of this user checks its access and its browser session again
    and closes (``CloseCode.REVOKED``) if either has ended; with ``session_hash``, the
    consoles of that browser session close whatever the check says (a logout: the
    session still exists while the signal runs)."""
    layer_publish(
        [
            (
                user_group(user_id),
                {
                    "type": RECHECK_MESSAGE,
                    "reason": reason,
                    "user_id": user_id,
                    "session_hash": session_hash,
                },
            )
        ]
    )
