"""Is this browser session still signed in as this user? Read-only, for long-lived sockets.

A console or events socket outlives the request that opened it. Django ends a session's
sign-in by deleting it (logout) or by a new password (the session's auth hash no longer
verifies); a socket learns of it only by asking again, which is what these do: the same
verification as ``django.contrib.auth.get_user`` (backend, active user, auth hash with
SECRET_KEY_FALLBACKS), without ever writing the session.
"""

import hashlib
from importlib import import_module

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.core.exceptions import ValidationError
from django.utils.crypto import constant_time_compare


def session_hash(session_key: str | None) -> str:
    """Name a browser session without storing or sending its key."""
    return hashlib.sha256((session_key or "").encode()).hexdigest()


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


def session_signed_in(*, session_key: str | None, user_id: int | None) -> bool:
    """Whether ``session_key`` is still a signed-in session of ``user_id``."""
    if not session_key or user_id is None:
        return False
    return session_user_id(session_key=session_key) == user_id


asession_signed_in = database_sync_to_async(session_signed_in)
