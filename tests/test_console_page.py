"""The console page and its ticket endpoint, for the whole cast.

The page only carries where to ask for a ticket and where to connect; the ticket itself
comes from a CSRF-protected POST, is stored hashed in Redis and never shows up in HTML.
"""

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

import pytest
import redis
from django.conf import settings
from django.contrib.staticfiles import finders
from django.contrib.staticfiles.views import serve
from django.templatetags.static import static
from django.test import Client
from django.urls import reverse

from labs.choices import ObservedState
from labs.consoles import tickets as consoles
from labs.models import Vm

pytestmark = pytest.mark.django_db


@pytest.fixture
def vms(group_a, group_b, make_vm):
    """A running VM for group A and one for group B (both groups approved)."""
    return (
        make_vm(group_a, ssh_port=22000, vnc_host="127.0.0.1", vnc_port=5900),
        make_vm(group_b, ssh_port=22001, vnc_host="127.0.0.1", vnc_port=5901),
    )


@pytest.fixture
def redis_client():
    """The Redis that holds tickets; every ticket key a test creates is removed after it."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    before = set(client.scan_iter(match=consoles.TICKET_PREFIX + "*"))
    yield client
    created = set(client.scan_iter(match=consoles.TICKET_PREFIX + "*")) - before
    if created:
        client.delete(*created)
    client.close()


def page_url(vm, mode=""):
    url = reverse("labs:vm_console", args=[vm.pk])
    return f"{url}?mode={mode}" if mode else url


def ticket_url(vm):
    return reverse("labs:vm_console_ticket", args=[vm.pk])


# --- the page ------------------------------------------------------------------------------


def test_members_get_a_console_page_that_drives_their_vm(client_for, alice, bob, vms):
    vm_a, _ = vms
    for user in (alice, bob):
        response = client_for(user).get(page_url(vm_a))
        assert response.status_code == 200
        text = response.content.decode()
        assert f'data-ws-path="/ws/vms/{vm_a.pk}/console/"' in text
        assert f'data-ticket-url="{ticket_url(vm_a)}"' in text
        assert 'data-subprotocol-prefix="stratus.ticket."' in text
        assert 'data-view-only="false"' in text
        assert ">Ctrl-Alt-Del</button>" in text and "Paste into VM" in text
        assert f'<script type="module" src="{static("js/console.js")}">' in text
        assert 'role="status" aria-live="polite"' in text
        assert reverse("labs:group_detail", args=[vm_a.group_id]) in text
        assert "Observe (view only)" not in text  # the mode switch is for course staff


def test_a_student_asking_for_observe_mode_still_gets_the_driving_page(client_for, alice, vms):
    vm_a, _ = vms
    text = client_for(alice).get(page_url(vm_a, "view")).content.decode()
    assert 'data-view-only="false"' in text and "Drive (take the keyboard)" not in text


def test_an_instructor_drives_by_default_and_can_switch_to_observing(client_for, ines, vms):
    vm_a, _ = vms
    client = client_for(ines)
    driving = client.get(page_url(vm_a))
    assert driving.status_code == 200
    text = driving.content.decode()
    assert 'data-view-only="false"' in text
    assert f'href="{page_url(vm_a, "view")}">Observe (view only)</a>' in text

    observing = client.get(page_url(vm_a, "view")).content.decode()
    assert 'data-view-only="true"' in observing
    assert f'href="{page_url(vm_a)}">Drive (take the keyboard)</a>' in observing
    assert "Ctrl-Alt-Del" not in observing and "Paste into VM" not in observing


@pytest.mark.parametrize("who", ["carol", "dave"])
def test_anyone_outside_the_group_gets_a_404(client_for, request, vms, who):
    vm_a, _ = vms
    assert client_for(request.getfixturevalue(who)).get(page_url(vm_a)).status_code == 404


def test_anonymous_visitors_are_sent_to_sign_in(client, vms):
    vm_a, _ = vms
    response = client.get(page_url(vm_a))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")


def test_a_deleted_vm_has_no_console(client_for, alice, vms):
    vm_a, _ = vms
    Vm.objects.filter(pk=vm_a.pk).update(desired_state="deleted")
    assert client_for(alice).get(page_url(vm_a)).status_code == 404


def test_the_page_never_carries_a_ticket(client_for, alice, vms, redis_client):
    vm_a, _ = vms
    client = client_for(alice)
    before = set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*"))
    page = client.get(page_url(vm_a)).content.decode()
    # Rendering the page issues nothing: tickets come only from the POST.
    assert set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*")) == before
    assert not re.search(r"stratus\.ticket\.[A-Za-z0-9_-]{20,}", page)

    token = client.post(ticket_url(vm_a)).json()["ticket"]
    again = client.get(page_url(vm_a)).content.decode()
    assert token not in again and token not in page


# --- the ticket endpoint -------------------------------------------------------------------


def test_a_member_gets_a_single_use_ticket_that_is_never_cached(client_for, bob, vms):
    vm_a, _ = vms
    response = client_for(bob).post(ticket_url(vm_a))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    data = response.json()
    assert set(data) == {"ticket", "expires_in", "view_only"}
    assert data["view_only"] is False
    assert 0 < data["expires_in"] == settings.CONSOLE_TICKET_TTL <= 60
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", data["ticket"])  # 256 bits, URL-safe base64


def test_each_request_gets_a_different_ticket(client_for, alice, vms):
    vm_a, _ = vms
    client = client_for(alice)
    first, second = (client.post(ticket_url(vm_a)).json()["ticket"] for _ in range(2))
    assert first != second


def test_the_ticket_endpoint_only_answers_posts(client_for, alice, vms):
    vm_a, _ = vms
    response = client_for(alice).get(ticket_url(vm_a))
    assert response.status_code == 405
    assert b"ticket" not in response.content


def test_the_ticket_endpoint_enforces_csrf(alice, vms):
    vm_a, _ = vms
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(ticket_url(vm_a)).status_code == 403

    # With the token the page hands out (what console.js sends), the same POST works.
    page = client.get(page_url(vm_a)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(ticket_url(vm_a), HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200 and response.json()["ticket"]


@pytest.mark.parametrize("who", ["carol", "dave"])
def test_outsiders_get_a_404_and_no_ticket(client_for, request, vms, who, redis_client):
    vm_a, _ = vms
    before = set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*"))
    response = client_for(request.getfixturevalue(who)).post(ticket_url(vm_a))
    assert response.status_code == 404
    assert set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*")) == before


def test_anonymous_posts_are_sent_to_sign_in(client, vms):
    vm_a, _ = vms
    response = client.post(ticket_url(vm_a))
    assert response.status_code == 302 and "ticket" not in response.content.decode()


def test_a_vm_that_is_not_running_gets_a_409_with_a_reason(client_for, alice, vms, redis_client):
    vm_a, _ = vms
    Vm.objects.filter(pk=vm_a.pk).update(observed_state=ObservedState.SHUTOFF)
    before = set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*"))
    response = client_for(alice).post(ticket_url(vm_a))
    assert response.status_code == 409
    assert response.json() == {"error": "vm1 is not running."}
    assert set(redis_client.scan_iter(match=consoles.TICKET_PREFIX + "*")) == before


def test_a_student_asking_for_view_mode_still_gets_a_driving_ticket(client_for, alice, vms):
    vm_a, _ = vms
    data = client_for(alice).post(ticket_url(vm_a), {"mode": "view"}).json()
    assert data["view_only"] is False


def test_an_instructor_gets_a_view_only_ticket_when_observing(client_for, ines, vms):
    vm_a, _ = vms
    client = client_for(ines)
    assert client.post(ticket_url(vm_a), {"mode": "view"}).json()["view_only"] is True
    assert client.post(ticket_url(vm_a)).json()["view_only"] is False


def test_redis_holds_the_tickets_hash_not_the_ticket(client_for, alice, vms, redis_client):
    vm_a, _ = vms
    client = client_for(alice)
    token = client.post(ticket_url(vm_a)).json()["ticket"]
    key = consoles.TICKET_PREFIX + hashlib.sha256(token.encode()).hexdigest()

    raw = redis_client.get(key)
    assert raw is not None
    assert 0 < redis_client.ttl(key) <= settings.CONSOLE_TICKET_TTL
    assert token.encode() not in raw
    assert not list(redis_client.scan_iter(match=f"*{token}*"))
    session_key = client.session.session_key
    stored = json.loads(raw)
    assert len(stored.pop("mac")) == 64  # signed with the SECRET_KEY (consoles.tickets)
    assert stored == {
        "user_id": alice.pk,
        "vm_id": vm_a.pk,
        "session_hash": hashlib.sha256(session_key.encode()).hexdigest(),
        "view_only": False,
    }
    assert session_key.encode() not in raw


# --- static files --------------------------------------------------------------------------


def test_novnc_is_served_from_the_npm_package_not_a_cdn():
    path = finders.find("novnc/core/rfb.js")
    assert path, "run `npm ci`: node_modules/@novnc/novnc is missing"
    assert "export default class RFB" in Path(path).read_text(encoding="utf-8")


def test_every_module_console_js_imports_is_a_static_file():
    source = Path(finders.find("js/console.js")).read_text(encoding="utf-8")
    imports = re.findall(r'^import .* from "([^"]+)";$', source, flags=re.MULTILINE)
    assert "../novnc/core/rfb.js" in imports
    for spec in imports:
        assert spec.startswith("../"), f"{spec}: only relative imports of our static files"
        resolved = PurePosixPath("js", spec)
        parts = []
        for part in resolved.parts:
            if part == "..":
                parts.pop()
            else:
                parts.append(part)
        assert finders.find("/".join(parts)), f"{spec} is not a static file"
    assert "http://" not in source and "https://" not in source
    assert "console.log" not in source and "localStorage" not in source


def test_the_module_script_and_novnc_are_served_as_javascript(rf):
    # Browsers refuse module scripts that are not served with a JavaScript MIME type.
    for path in ("js/console.js", "novnc/core/rfb.js", "novnc/core/input/keysymdef.js"):
        response = serve(rf.get(static(path)), path, insecure=True)
        assert response.status_code == 200, path
        assert response["Content-Type"].split(";")[0] in {
            "text/javascript",
            "application/javascript",
        }, path
