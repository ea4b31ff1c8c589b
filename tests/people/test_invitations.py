"""Invitations and password resets: an invited student who lost the mail gets a new link
from the reset page; invitation links keep a week, ordinary reset links a few hours."""

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.urls import reverse
from django.utils import timezone

from labs.people import mail as stratus_mail
from labs.people.tokens import account_tokens

pytestmark = pytest.mark.django_db


def link_in(message) -> str:
    return re.search(r"https?://\S+/accounts/reset/\S+/", message.body).group(0)


def ask_for_a_link(client, email: str):
    return client.post(reverse("password_reset"), {"email": email}, follow=True)


def test_an_invited_student_who_lost_the_mail_gets_a_new_link(client, alice):
    assert not alice.has_usable_password() and alice.last_login is None
    page = ask_for_a_link(client, alice.email)
    assert page.status_code == 200
    [message] = mail.outbox
    assert message.to == [alice.email]
    path = link_in(message).split("://", 1)[1].split("/", 1)[1]
    assert client.get("/" + path, follow=True).status_code == 200


def test_the_page_says_the_same_for_an_address_nobody_has(client, alice):
    known = ask_for_a_link(client, alice.email).content.decode()
    unknown = ask_for_a_link(client, "nobody@example.edu").content.decode()
    assert len(mail.outbox) == 1
    strip = re.compile(r'name="csrfmiddlewaretoken" value="[^"]*"')
    assert strip.sub("", known) == strip.sub("", unknown)


def _aged(monkeypatch, delta: timedelta) -> None:
    later = timezone.now().replace(tzinfo=None) + delta
    monkeypatch.setattr(account_tokens, "_now", lambda: later)


def test_an_invitation_link_keeps_a_week(alice, monkeypatch):
    link = stratus_mail.invitation_link(user=alice)
    token = link.rstrip("/").rsplit("/", 1)[1]
    _aged(monkeypatch, timedelta(days=6))
    assert account_tokens.check_token(alice, token)
    _aged(monkeypatch, timedelta(days=8))
    assert not account_tokens.check_token(alice, token)


def test_a_reset_link_for_an_account_in_use_keeps_a_few_hours(alice, monkeypatch):
    alice.set_password("a long passphrase of hers")
    alice.last_login = timezone.now()
    alice.save()
    token = account_tokens.make_token(alice)
    _aged(monkeypatch, timedelta(hours=2))
    assert account_tokens.check_token(alice, token)
    _aged(monkeypatch, timedelta(hours=4))
    assert not account_tokens.check_token(alice, token)
