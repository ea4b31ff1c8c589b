"""The page cache (labs/live/pagecache.py): a page whose parts nothing touched is served
from the cache with the viewer's own token; every kind of change shows on the next fetch
(a service's event, a save the admin makes, a change committed by another process);
a cache that does not answer costs speed, never correctness."""

import re

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from labs.choices import ObservedState
from labs.live import events, pagecache, regions
from labs.models import Host, Vm
from labs.people.groups import group_key_replace
from tests.live.test_regions import META_TOKEN, TOKEN_INPUT, tokens_in

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _one_span_of_the_clock():
    """Every key carries the current 30-s span of the clock: a test that crossed a span's
    end would see a part rendered anew (the bound, not a stale part). Hold the clock."""
    with time_machine.travel(timezone.now(), tick=False):
        yield


def but_time_and_tokens(html: str) -> str:
    """A page but for when it was read and its CSRF tokens (masked anew every time)."""
    html = re.sub(r'data-live-at="[0-9.]+"', "", html)
    return re.sub(r'(content|value)="[A-Za-z0-9]{64}"', "", html)


@pytest.fixture
def page(client_for, group_a, make_vm):
    """GET the group page as a user: (queries, HTML)."""
    make_vm(group_a, name="vm1", ssh_port=22000)

    def get(user) -> tuple[int, str]:
        client = client_for(user)
        with CaptureQueriesContext(connection) as captured:
            html = client.get(f"/groups/{group_a.pk}/").content.decode()
        return len(captured), html

    return get


def test_a_page_nothing_touched_comes_from_the_cache_with_each_viewers_own_token(page, alice, bob):
    cold, first = page(alice)
    warm, again = page(alice)
    assert warm < cold and warm <= 5, (cold, warm)  # session, user, the group and members
    assert but_time_and_tokens(again) == but_time_and_tokens(first)

    _, bobs = page(bob)  # Alice's rendering, Bob's token
    bob_token = META_TOKEN.search(bobs).group(1)
    forms = tokens_in(bobs)
    assert forms, "the page's forms carry a token without JavaScript"
    assert not forms & tokens_in(again)  # none of Alice's in Bob's page
    assert pagecache.slot() not in bobs and "stratus-csrf-slot" not in bobs
    assert bob_token not in again


def test_a_change_a_service_makes_shows_on_the_next_fetch(page, alice, group_a, make_public_key):
    old = group_a.ssh_key_fingerprint
    assert old in page(alice)[1]
    group_key_replace(group=group_a, by=alice, ssh_public_key=make_public_key())
    group_a.refresh_from_db()
    _, html = page(alice)
    assert group_a.ssh_key_fingerprint in html and old not in html


def test_a_save_without_an_event_shows_on_the_next_fetch(page, alice, group_a):
    """The admin saves rows without any service: the models' signals see it."""
    _, before = page(alice)
    assert "state-running" in before
    vm = Vm.objects.get(group=group_a)
    vm.observed_state = ObservedState.SHUTOFF
    vm.save()
    _, after = page(alice)
    assert "state-shutoff" in after and "state-running" not in after

    host = vm.host
    host.name = "hv-renamed"
    host.save()
    assert "hv-renamed" in page(alice)[1]


def test_every_watched_row_of_a_group_bumps_its_page(group_a):
    """A firewall rule saved or deleted by the admin or a shell (no service, no event)."""
    from labs.models import FirewallRule

    before = pagecache.group_versions(group_a.pk)
    rule = FirewallRule.objects.create(
        group=group_a, protocol="tcp", port_from=80, port_to=80, source="group"
    )
    saved = pagecache.group_versions(group_a.pk)
    rule.delete()
    assert before != saved != pagecache.group_versions(group_a.pk)


def test_an_event_from_another_process_shows_on_the_next_fetch(page, alice, group_a):
    """A worker changes a row with a queryset update and publishes the event after its
    commit: the page that was cached before is not served again."""
    page(alice)
    vm = Vm.objects.get(group=group_a)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SAVED)  # no signal
    assert "state-saved" not in page(alice)[1]  # what the cache holds, until the event
    events._publish_payload(events.vm_payload(vm_id=vm.pk))
    assert "state-saved" in page(alice)[1]


def test_a_save_bumps_again_at_commit(group_a, django_capture_on_commit_callbacks):
    """Another process may render between the write and the commit (it reads the old
    row under the new version): the bump at commit leaves that rendering behind."""
    seen = []
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        group_a.project_idea = "Changed."
        group_a.save()
        seen.append(pagecache.group_versions(group_a.pk))
    for callback in callbacks:
        callback()
    assert pagecache.group_versions(group_a.pk) != seen[0]


def test_the_staff_and_the_members_keep_their_own_renderings(page, alice, ines):
    _, members = page(alice)
    _, staff = page(ines)
    assert 'data-live-audience="staff"' in staff and "?mode=view" in staff
    assert 'data-live-audience="members"' in members and "?mode=view" not in members
    assert "Replace key" in page(alice)[1] and "Replace key" not in page(ines)[1]


def test_a_cache_that_does_not_answer_renders_every_page(
    page, alice, group_a, monkeypatch, make_public_key
):
    def down(*args, **kwargs):
        raise ConnectionError("no Redis")

    for name in ("get", "get_many", "set", "set_many", "add"):
        monkeypatch.setattr(pagecache.cache, name, down)
    cold, html = page(alice)
    again, _ = page(alice)
    assert "Alpha" in html and again == cold  # rendered each time, from the database
    group_key_replace(group=group_a, by=alice, ssh_public_key=make_public_key())
    group_a.refresh_from_db()
    assert group_a.ssh_key_fingerprint in page(alice)[1]


def test_a_push_carries_no_token_and_a_page_fetched_after_it_reads_the_push(page, alice, group_a):
    early = pagecache.group_versions(group_a.pk)
    parts = regions.group_parts(group=group_a, staff=False, early=early)
    pushed = {key: pagecache.for_push(html) for key, html in parts.items()}
    assert not any("csrfmiddlewaretoken" in html for html in pushed.values())
    before = dict(regions.RENDERS)
    _, html = page(alice)
    assert dict(regions.RENDERS) == before  # the page used the push's rendering
    for key, region in pushed.items():
        assert region in TOKEN_INPUT.sub("", html), key


def test_a_host_that_stops_answering_shows_on_the_overview_at_once(client_for, ines, course):
    from labs.compute import reconcile

    host = Host.objects.create(
        name="hv9", uri="test:///nonexistent-hv9", vcpus=8, memory_mib=8192, disk_gib=100
    )
    client = client_for(ines)
    url = f"/courses/{course.slug}/overview/"
    client.get(url)
    reconcile.host_reconcile(host=host)
    assert "hv9" in client.get(url).content.decode()
    reconcile.host_reconcile(host=host)  # the Host row changes by a queryset update
    text = client.get(url).content.decode()
    assert re.search(r"hv9.*?unreachable since", text, re.S), text
