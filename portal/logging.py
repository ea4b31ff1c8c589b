"""Structured logs: one line per record, and one line per HTTP request.

- ``JsonFormatter`` writes each record as one JSON object on one line (the default, for
  log collectors); ``TextFormatter`` writes the same fields for a person reading a terminal
  (``LOG_FORMAT=text``, what ``make run`` uses).
- ``RequestLogMiddleware`` logs one line per request: method, path with its query string
  (secrets redacted), status, duration, user id and a request id. The request id also goes
  on every other record logged while the request runs (``RequestIdFilter``) and back to the
  client in the ``X-Request-ID`` header.

Secrets never reach a line: password-reset/invitation tokens in paths and query values
named like a secret are redacted from the request line, and both formatters scrub the
same patterns (plus console ticket subprotocols) from every message as a last line of
defence.
"""

import contextvars
import json
import logging
import re
import time
import unicodedata
import uuid
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.utils.functional import empty

REDACTED = "REDACTED"

# Query parameters whose name contains one of these are never logged.
_SECRET_NAMES = ("token", "ticket", "password", "passwd", "secret", "key", "session", "signature")
# Django's password-reset (and so invitation) links: /accounts/reset/<uidb64>/<token>/.
# After its first GET Django redirects to .../<uidb64>/set-password/, which is not secret.
_RESET_PATH = re.compile(r"(/reset/[^/?#\s]+/)(?!set-password/)([^/?#\s]+)(?=/)")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;][^=&#\s]*(?:" + "|".join(_SECRET_NAMES) + r")[^=&#\s]*=)([^&#\s\"']+)"
)
# The console's websocket subprotocol carries its ticket (docs/console.md).
_TICKET_PROTOCOL = re.compile(r"(stratus\.ticket\.)[A-Za-z0-9_-]+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else on a record was passed with ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def scrub(text: str) -> str:
    """Remove what looks like a secret from free text (a path, a message)."""
    text = _RESET_PATH.sub(rf"\1{REDACTED}", text)
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    return _TICKET_PROTOCOL.sub(rf"\1{REDACTED}", text)


def redact_query(query: str) -> str:
    """The query string with the value of every secret-looking parameter replaced."""
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [
            (name, REDACTED if any(s in name.lower() for s in _SECRET_NAMES) else value)
            for name, value in pairs
        ],
        safe="/:",
    )


def redact_path(path: str, query: str = "") -> str:
    """What a request line shows of a URL: the path and the query, secrets replaced."""
    shown = _RESET_PATH.sub(rf"\1{REDACTED}", path)
    query = redact_query(query)
    return f"{shown}?{query}" if query else shown


# uvicorn adds its message again with terminal colours: not worth a field.
_DROPPED = frozenset({"color_message"})
# Fields the text format's message already shows.
_IN_TEXT_MESSAGE = frozenset(
    {"event", "method", "path", "status", "duration_ms", "operation_id", "kind"}
)


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k not in _DROPPED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, scrub(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def escape_controls(text: str) -> str:
    """Control, format (bidi) and separator characters written as escapes (``\\n``,
    ``\\u202e``), so that one record is one line and reads as it is."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        else char
        for char in text
    )


class TextFormatter(logging.Formatter):
    """For a terminal: ``time LEVEL logger message key=value ...`` (tracebacks follow)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # The message and the fields are one line whatever they carry (a newline in a
        # group name must not forge a log line); a traceback after them keeps its lines.
        saved = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        try:
            line = scrub(super().format(record))
        finally:
            record.msg, record.args = saved
        fields = " ".join(
            f"{k}={escape_controls(scrub(str(v)))}"
            for k, v in _extras(record).items()
            if k not in _IN_TEXT_MESSAGE and v not in (None, "")
        )
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # key=value stays on the first line
        return f"{head} {fields}{sep}{tail}"


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to every record logged while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        return True


request_log = logging.getLogger("stratus.request")


class RequestLogMiddleware:
    """One log line per request (put it first in MIDDLEWARE, so it times everything)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        token, started = self._start(request)
        try:
            response = self.get_response(request)
            self._log(request, response, started)
            return response
        finally:
            request_id_var.reset(token)

    async def __acall__(self, request):
        token, started = self._start(request)
        try:
            response = await self.get_response(request)
            self._log(request, response, started)
            return response
        finally:
            request_id_var.reset(token)

    def _start(self, request):
        given = request.headers.get("X-Request-ID", "")
        request.id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        return request_id_var.set(request.id), time.monotonic()

    def _log(self, request, response, started: float) -> None:
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        path = redact_path(request.path, request.META.get("QUERY_STRING", ""))
        response["X-Request-ID"] = request.id
        status = response.status_code
        level = logging.ERROR if status >= 500 else logging.INFO
        request_log.log(
            level,
            "%s %s %s %.1fms",
            request.method,
            path,
            status,
            duration_ms,
            extra={
                "event": "request",
                "method": request.method,
                "path": path,
                "status": status,
                "duration_ms": duration_ms,
                "user_id": _user_id(request),
                "request_id": request.id,
            },
        )


def _user_id(request) -> int | None:
    """The user's id if the request already looked the user up (no query just for logs)."""
    user = getattr(request, "user", None)
    wrapped = getattr(user, "_wrapped", user)
    if user is None or wrapped is empty:
        return None
    return wrapped.pk if getattr(wrapped, "is_authenticated", False) else None
