"""A request that cannot reach the database gets a page that says so.

While PostgreSQL restarts (or the network to it is down) every view that touches the
database fails with an OperationalError; unhandled, that is a bare "Server Error (500)"
or, with DEBUG, a traceback. Instead the answer is a 503 with a Retry-After and a page
that tells the person what happened and that a change they were making was not made.
The page is rendered without the request's context: the context processors would ask the
database again.
"""

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.template.loader import render_to_string

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 30


def database_unavailable_response() -> HttpResponse:
    response = HttpResponse(render_to_string("503_database.html"), status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        # The error's text names the server and why (never a password: the URL's password
        # is not part of psycopg's messages); one line, the class and the first line.
        first = str(exception).strip().splitlines()[:1]
        log.warning(
            "database unavailable: %s %s -> 503 (%s: %s)",
            request.method,
            request.path,
            type(exception).__name__,
            first[0] if first else "",
        )
        return database_unavailable_response()
