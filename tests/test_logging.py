"""Structured logs: one JSON line per request and per operation run, and no secret in any."""

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from labs.choices import OperationKind
from labs.compute import requests
from labs.models import Host, Operation, Snapshot
from labs.people import mail
from labs.tasks import operation_run_task
from portal.logging import JsonFormatter, TextFormatter, redact_path, scrub


@pytest.fixture
def log_lines():
    """The lines the configured console handler writes (JSON), as parsed objects."""
    handler = logging.getHandlerByName("console")
    assert handler is not None, "settings.LOGGING has a handler named console"
    stream = io.StringIO()
    old_stream = handler.setStream(stream)
    old_formatter = handler.formatter
    handler.setFormatter(JsonFormatter())

    def lines(**match) -> list[dict]:
        parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [p for p in parsed if all(p.get(k) == v for k, v in match.items())]

    lines.text = stream.getvalue
    yield lines
    handler.setStream(old_stream)
    handler.setFormatter(old_formatter)


# --- one line per request ------------------------------------------------------------------


@pytest.mark.django_db
def test_a_request_writes_exactly_one_json_line_with_its_fields(client, log_lines):
    response = client.get("/healthz?probe=lb&token=abc123")

    [line] = log_lines()
    assert line["event"] == "request"
    assert (line["method"], line["status"]) == ("GET", 200)
    assert line["path"] == "/healthz?probe=lb&token=REDACTED"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["user_id"] is None
    assert line["request_id"] == response["X-Request-ID"]
    assert line["level"] == "INFO" and line["logger"] == "stratus.request"
    assert line["message"] == f"GET /healthz?probe=lb&token=REDACTED 200 {line['duration_ms']}ms"
    assert "abc123" not in log_lines.text()


@pytest.mark.django_db
def test_the_request_line_names_the_signed_in_user_and_keeps_a_given_request_id(
    client_for, alice, log_lines
):
    client = client_for(alice)

    client.get(reverse("labs:home"), headers={"X-Request-ID": "lb-7f3a"})

    [line] = log_lines(event="request")
    assert (line["path"], line["user_id"], line["request_id"]) == ("/", alice.pk, "lb-7f3a")


@pytest.mark.django_db
def test_a_request_id_that_could_forge_log_fields_is_replaced(client, log_lines):
    response = client.get("/healthz", headers={"X-Request-ID": 'x" "level": "ERROR'})

    [line] = log_lines(event="request")
    assert line["request_id"] == response["X-Request-ID"]
    assert '"' not in line["request_id"] and len(line["request_id"]) == 16


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_an_async_request_writes_one_line_too(async_client, settings, log_lines):
    # WhiteNoise is sync-only, so below it Django runs the chain in a thread; without it
    # the middleware runs on the event loop (its __acall__).
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.startswith("whitenoise")]

    response = await async_client.get("/healthz")

    [line] = log_lines(event="request")
    assert (line["path"], line["status"]) == ("/healthz", 200)
    assert line["request_id"] == response["X-Request-ID"]


def test_uvicorns_own_access_log_stays_off_once_django_has_configured_logging():
    """In uvicorn's order: its logging config (access log off), then the app's import
    (Django's LOGGING). uvicorn writes access lines only if that logger has a handler."""
    script = (
        "import logging, uvicorn.config\n"
        "uvicorn.config.Config('portal.asgi:application', access_log=False)\n"
        "import portal.asgi\n"
        "print(logging.getLogger('uvicorn.access').hasHandlers())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=settings.BASE_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "portal.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.django_db
def test_the_text_format_shows_each_field_once(client, log_lines):
    handler = logging.getHandlerByName("console")
    handler.setFormatter(TextFormatter())

    response = client.get("/healthz?ticket=abc123")

    [line] = log_lines.text().splitlines()
    request_id = response["X-Request-ID"]
    assert re.fullmatch(
        r"\S+ \S+ INFO stratus\.request GET /healthz\?ticket=REDACTED 200 [\d.]+ms "
        f"request_id={request_id}",
        line,
    ), line


# --- no secret in any line -----------------------------------------------------------------


@pytest.mark.django_db
def test_no_console_ticket_or_reset_token_reaches_any_log_line(
    client_for, alice, dave, group_a, make_vm, caplog, log_lines
):
    """A whole flow: a console ticket issued (and pasted into a URL by mistake), an
    invitation link opened and a password chosen with it."""
    caplog.set_level(logging.DEBUG)
    vm = make_vm(group_a)
    member = client_for(alice)
    ticket = member.post(reverse("labs:vm_console_ticket", args=[vm.pk])).json()["ticket"]
    member.get(reverse("labs:vm_console", args=[vm.pk]) + f"?ticket={ticket}&mode=view")

    link = mail.invitation_link(user=dave)
    path = link.removeprefix("http://127.0.0.1:8000")
    uidb64, token = path.strip("/").split("/")[-2:]
    browser = Client()
    set_password = browser.get(path)
    assert set_password.status_code == 302  # Django keeps the token in the session
    browser.get(set_password.url)
    done = browser.post(
        set_password.url,
        {"new_password1": "a-long-new-passphrase-42", "new_password2": "a-long-new-passphrase-42"},
    )
    assert done.status_code == 302
    dave.refresh_from_db()
    assert dave.check_password("a-long-new-passphrase-42")

    written = log_lines.text()
    recorded = caplog.text + "".join(repr(vars(r)) for r in caplog.records)
    for secret in (ticket, token):
        assert secret not in written
        assert secret not in recorded
    paths = [line["path"] for line in log_lines(event="request")]
    assert f"/accounts/reset/{uidb64}/REDACTED/" in paths
    assert f"/vms/{vm.pk}/console/?ticket=REDACTED&mode=view" in paths
    assert len(paths) == 5  # one line per request, nothing else about them


def test_paths_keep_what_is_not_secret():
    assert redact_path("/accounts/reset/MQ/set-password/") == "/accounts/reset/MQ/set-password/"
    assert redact_path("/groups/3/", "page=2&q=a+b") == "/groups/3/?page=2&q=a+b"
    assert redact_path("/x", "api_key=k&Password=p&csrfmiddlewaretoken=c&next=/y") == (
        "/x?api_key=REDACTED&Password=REDACTED&csrfmiddlewaretoken=REDACTED&next=/y"
    )


def test_every_formatted_message_is_scrubbed_as_a_last_resort(log_lines):
    logging.getLogger("labs.test").warning(
        "odd client: %s offered %s",
        "/accounts/reset/MQ/cbx7c8-0123456789abcdef/",
        "stratus.ticket.Zm9vYmFyYmF6cXV4cXV1eA",
    )

    [line] = log_lines(logger="labs.test")
    assert line["message"] == (
        "odd client: /accounts/reset/MQ/REDACTED/ offered stratus.ticket.REDACTED"
    )
    assert scrub("GET /x?ticket=abc&a=1") == "GET /x?ticket=REDACTED&a=1"


# --- one line per operation run --------------------------------------------------------------


@pytest.fixture
def test_driver_host(db):
    """libvirt's own test driver: no domain of ours exists there."""
    return Host.objects.create(
        name="testdrv", uri="test:///default", vcpus=4, memory_mib=8192, disk_gib=100
    )


@pytest.mark.django_db
def test_an_operation_run_writes_one_line_with_how_it_ended(
    group_a, make_vm, test_driver_host, log_lines
):
    vm = make_vm(group_a, host=test_driver_host)
    Snapshot.objects.create(vm=vm, name="before-lab", with_memory=False)
    op = requests.vm_operation_request(
        vm=vm, kind=OperationKind.SNAPSHOT_DELETE, by=None, params={"name": "before-lab"}
    )

    operation_run_task.apply(args=[op.pk])

    [line] = log_lines(event="operation")
    assert line["operation_id"] == op.pk and line["vm_id"] == vm.pk
    assert (line["kind"], line["status"], line["attempts"]) == ("snapshot_delete", "succeeded", 1)
    assert line["error"] == "" and line["level"] == "INFO"
    assert isinstance(line["duration_ms"], float)
    assert log_lines(event="request") == []


@pytest.mark.django_db
def test_a_failed_operation_run_logs_the_message_the_students_see(
    group_a, make_vm, test_driver_host, log_lines
):
    vm = make_vm(group_a, host=test_driver_host)
    op = requests.vm_operation_request(vm=vm, kind=OperationKind.REBOOT, by=None)

    operation_run_task.apply(args=[op.pk])

    op.refresh_from_db()
    [line] = log_lines(event="operation")
    assert (line["status"], line["level"], line["kind"]) == ("failed", "WARNING", "reboot")
    assert line["error"] == op.error != ""
    assert Operation.objects.get(pk=op.pk).status == "failed"


def test_the_text_format_keeps_one_record_on_one_line_whatever_it_carries():
    record = logging.LogRecord(
        "labs.test", logging.WARNING, __file__, 1, "group %s approved", ("A\nFAKE LINE",), None
    )
    record.group = "B\u202eevil\r\n"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u202e" not in line
    assert "A\\nFAKE LINE" in line and "group=B\\u202eevil\\r\\n" in line
