"""A view that cannot reach its database answers 503 with a page that says so (the real
outage, a PostgreSQL restarted under load, is tests/integration/test_postgres_restart.py)."""

import logging

import pytest
from django.db import IntegrityError, OperationalError
from django.test import RequestFactory

from portal.middleware import DatabaseUnavailableMiddleware


def _middleware():
    return DatabaseUnavailableMiddleware(lambda request: None)


def test_an_unreachable_database_is_a_503_that_says_so_and_asks_to_retry(caplog):
    request = RequestFactory().post("/vms/3/reboot/")
    error = OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        "Connection refused\n\tIs the server running on that host?"
    )
    with caplog.at_level(logging.WARNING, logger="portal.middleware"):
        response = _middleware().process_exception(request, error)
    assert response.status_code == 503
    assert response["Retry-After"] == "30"
    page = response.content.decode()
    assert "The database is not answering right now" in page
    assert "If you were making a change, it was not made" in page
    (record,) = caplog.records
    assert "POST /vms/3/reboot/ -> 503" in record.getMessage()
    assert "\n" not in record.getMessage()  # one line, the error's first


@pytest.mark.parametrize("error", [IntegrityError("duplicate key"), ValueError("bad")])
def test_other_errors_are_left_to_django(error):
    assert _middleware().process_exception(RequestFactory().get("/"), error) is None


@pytest.mark.django_db
def test_the_middleware_is_installed_and_pages_still_render(client):
    from django.conf import settings

    assert "portal.middleware.DatabaseUnavailableMiddleware" in settings.MIDDLEWARE
    assert client.get("/accounts/login/").status_code == 200
