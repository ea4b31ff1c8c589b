"""Sign-ins, console tickets and password-reset mails are throttled per account and per
address, each with a clear message (and the reset page still says nothing of who exists)."""

import uuid

import pytest
from django.core import mail
from django.test import Client
from django.urls import reverse

from labs import throttle

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_counters(monkeypatch):
    monkeypatch.setattr(throttle, "PREFIX", f"stratus-test-throttle-{uuid.uuid4().hex}:")


def sign_in(client, username: str, password: str):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR="127.0.0.9"
    )


def test_an_account_is_locked_after_a_few_wrong_passwords_then_its_right_one_waits(
    alice, settings
):
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 3
    alice.set_password("the right passphrase here")
    alice.save()
    client = Client()
    for _ in range(2):
        assert sign_in(client, "alice", "wrong").status_code == 200  # the form again
    assert sign_in(client, "alice", "wrong").status_code == 429  # the third: locked
    locked = sign_in(client, "alice", "the right passphrase here")
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.content.decode()
    assert "_auth_user_id" not in client.session


def test_console_tickets_are_throttled_per_account(client_for, alice, group_a, make_vm, settings):
    settings.TICKETS_PER_MINUTE = 2
    vm = make_vm(group_a, vnc_socket="/run/x.sock")
    client = client_for(alice)
    url = reverse("labs:vm_console_ticket", args=[vm.pk])
    assert [client.post(url).status_code for _ in range(2)] == [200, 200]
    refused = client.post(url)
    assert refused.status_code == 429
    assert "Too many requests for console tickets; try again in" in refused.json()["error"]


def test_reset_mails_are_throttled_per_address_aloud_and_per_account_silently(alice, settings):
    settings.RESETS_PER_HOUR = 2
    client = Client()
    url = reverse("password_reset")
    for _ in range(3):
        client.post(url, {"email": alice.email}, REMOTE_ADDR="127.0.0.7")
    assert len(mail.outbox) == 2  # the third was not sent, and the page did not say so
    # From one address, over four times the per-account limit: said plainly.
    for n in range(8):
        client.post(url, {"email": f"x{n}@example.edu"}, REMOTE_ADDR="127.0.0.8")
    page = client.post(url, {"email": "y@example.edu"}, REMOTE_ADDR="127.0.0.8")
    assert page.status_code == 200
    assert "Too many requests for password-reset mails from your address" in (
        page.content.decode()
    )
