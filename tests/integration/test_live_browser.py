"""Acceptance test of live updates (issue #5): three browsers on the real stack.

uvicorn serves the pages and /ws/events/, a real Celery worker runs the operations on a
real QEMU guest, Redis carries the events between them. Alice and Bob are teammates,
Carol is in another group. Bob's page is never reloaded (a marker set in its window
survives the whole test), yet it follows the approval, the provisioning, Alice's snapshot
from queued to succeeded, and, after the server restarts under it, catches up on a
snapshot that finished while it was disconnected. Carol's socket, meanwhile, carries only
her own group's events. Bob's page fetches itself only when its socket (re)opens: the
changed regions are pushed to it, rendered once for the group.
"""

import json
import secrets

import pytest
from django.db import connections

from labs.choices import GroupStatus, OperationKind
from labs.compute.requests import vm_operation_request
from labs.models import Group, Membership, Operation, Vm
from labs.people.groups import group_approve, membership_group_set

from ..e2e.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from .conftest import live, sign_in, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROVISION_TIMEOUT_MS = 180_000  # TCG on a busy two-core machine
LIVE_TIMEOUT_MS = 5_000  # after the database says so: live means within a second or so

RECORD_EVENTS = """() => {
  window.__noReload = 1;
  window.__events = [];
  window.__shown = {};  // operation row id -> when the page first showed it succeeded
  window.__members = document.querySelector('[data-live-region=members]');
  document.addEventListener('live:event', (e) => {
    window.__events.push({...e.detail, at: Date.now()});
  });
  new MutationObserver(() => {
    for (const status of document.querySelectorAll('tr[id^=op-] .op-status')) {
      const row = status.closest('tr').id;
      if (status.textContent === 'Succeeded' && !(row in window.__shown)) {
        window.__shown[row] = Date.now();
      }
    }
  }).observe(document.body, {childList: true, subtree: true});
}"""


@pytest.mark.sqlite_pass_only  # live pages: Redis and the browser, not the database
def test_a_teammates_page_follows_live_catches_up_after_a_restart_other_groups_hear_nothing(
    course,
    alice,
    bob,
    carol,
    dave,
    ines,
    qemu_host,
    debian_template,
    worker,
    asgi_server,
    server_channels,
    group_a,
    make_group,
    monkeypatch,
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM beside Playwright's loop
    password = secrets.token_urlsafe(12)
    for user in (alice, bob, carol):
        user.set_password(password)
        user.save()
    alpha = group_a
    # Carol's group is approved without a VM of its own: a second guest would double the
    # test's time on two cores, and her page listens all the same.
    charlie = make_group(course=course, by=carol, name="Charlie")
    Group.objects.filter(pk=charlie.pk).update(status=GroupStatus.APPROVED)

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            alices = sign_in(browser, asgi_server, alice, password)
            bobs = sign_in(browser, asgi_server, bob, password)
            carols = sign_in(browser, asgi_server, carol, password)
            carol_sockets, carol_frames = [], []

            def on_socket(ws):
                if "/ws/events/" in ws.url:  # a group page says which: ?group=<id>
                    carol_sockets.append(ws)
                    ws.on("framereceived", lambda frame: carol_frames.append(frame))

            carols.on("websocket", on_socket)
            # Bob's page fetches itself once per socket open, never for an event (the
            # changed regions are pushed, rendered once for the group).
            bobs_fetches = []
            bobs.on(
                "request",
                lambda request: (
                    bobs_fetches.append(request.url)
                    if request.headers.get("x-live-refresh")
                    else None
                ),
            )
            for page, group in ((alices, alpha), (bobs, alpha), (carols, charlie)):
                page.goto(f"{asgi_server.url}/groups/{group.pk}/")
                live(page)
            bobs.evaluate(RECORD_EVENTS)
            assert bobs.get_by_text("Waiting for an instructor to review this group.").is_visible()

            # 1. The instructor approves: Bob's page shows the group approved, then its VM
            #    provisioned by the worker and running.
            group_approve(group=alpha, by=ines)
            vm = Vm.objects.get(group=alpha)
            bobs.locator("h1 .badge", has_text="Approved").wait_for(timeout=LIVE_TIMEOUT_MS)
            bobs.locator(f"#vm-{vm.pk} h3 .badge", has_text="Running").wait_for(
                timeout=PROVISION_TIMEOUT_MS
            )
            wait_operation(Operation.objects.get(vm=vm), timeout=30)

            # 2. Bob starts typing a snapshot name of his own; Alice takes a snapshot.
            bobs_field = bobs.get_by_label("Snapshot name")
            bobs_field.fill("bobs-draft")
            alices.locator(f"#vm-{vm.pk} h3 .badge", has_text="Running").wait_for()
            alices.get_by_label("Snapshot name").fill("before-lab")
            alices.get_by_role("button", name="Take snapshot (with memory)").click()
            alices.get_by_text("Snapshot of vm1 is queued.").wait_for()
            snapshot = Operation.objects.get(vm=vm, kind=OperationKind.SNAPSHOT)
            wait_operation(snapshot, timeout=120)

            # Bob's page, never reloaded, shows it succeeded and the snapshot in the list,
            # announces it, and still holds what he was typing, with the focus.
            row = bobs.locator(f"#op-{snapshot.pk}")
            row.locator(".op-status", has_text="Succeeded").wait_for(timeout=LIVE_TIMEOUT_MS)
            assert "“before-lab”" in row.inner_text()
            bobs.locator(f"[data-live-region='vm-{vm.pk}-snapshots'] .snapshot-name").filter(
                has_text="before-lab"
            ).wait_for(timeout=LIVE_TIMEOUT_MS)
            assert bobs.locator("[data-live-announce]").inner_text() == "Snapshot of vm1 succeeded"
            assert bobs_field.input_value() == "bobs-draft"
            assert bobs_field.evaluate("field => document.activeElement === field")
            seen = bobs.evaluate(
                "id => window.__events.filter(e => e.operation === id)", snapshot.pk
            )
            assert [e["status"] for e in seen][0] == "queued" and seen[-1]["status"] == "succeeded"
            assert "running" in [e["status"] for e in seen]
            finished_ms = snapshot.finished_at.timestamp() * 1000
            heard_after = seen[-1]["at"] - finished_ms
            shown_after = bobs.evaluate(f"window.__shown['op-{snapshot.pk}']") - finished_ms
            assert bobs.evaluate("window.__noReload") == 1
            # What did not change was not swapped (the very same element is still there).
            assert bobs.evaluate(
                "window.__members === document.querySelector('[data-live-region=members]')"
            )

            assert len(bobs_fetches) == 1, bobs_fetches  # the first open, nothing since

            # 3. Carol's socket was connected all along and carried her own group's news
            #    (Dave joins her group), and not one frame about Alpha.
            daves = Membership.objects.get(user=dave)
            membership_group_set(membership=daves, group=charlie, by=ines)
            carols.locator("ul.members", has_text="dave").wait_for(timeout=LIVE_TIMEOUT_MS)
            assert carol_sockets and not carol_sockets[0].is_closed()
            heard = [json.loads(frame) for frame in carol_frames]
            assert heard and all(event["group"] == charlie.pk for event in heard)
            assert not any("Alpha" in f or "before-lab" in f or "vm1" in f for f in carol_frames)

            # 4. The server goes away; a snapshot finishes meanwhile; the server comes back.
            bobs_field.evaluate("field => field.blur()")
            asgi_server.stop()
            bobs.locator("[data-live-status][data-state='reconnecting']").wait_for()
            offline = vm_operation_request(
                vm=vm, kind=OperationKind.SNAPSHOT, by=bob, params={"name": "while-offline"}
            )
            wait_operation(offline, timeout=120)
            asgi_server.start()
            live(bobs)
            bobs.locator(f"#op-{offline.pk} .op-status", has_text="Succeeded").wait_for(
                timeout=LIVE_TIMEOUT_MS
            )
            assert (
                bobs.locator(f"[data-live-region='vm-{vm.pk}-snapshots']")
                .inner_text()
                .count("while-offline")
            )
            assert bobs.evaluate("window.__noReload") == 1
            assert bobs_field.input_value() == "bobs-draft"
            assert len(bobs_fetches) >= 2  # the catch-up after the restart
            ARTIFACTS.mkdir(exist_ok=True)
            bobs.screenshot(path=str(ARTIFACTS / "live-group-page.png"), full_page=True)
            browser.close()
        finally:
            # The ORM calls made beside Playwright's loop have their own connection (asgiref
            # keeps connections per context): close it here, or PostgreSQL cannot drop the
            # test database.
            connections.close_all()

    print(
        f"Bob's page heard the snapshot succeeded {heard_after:.0f} ms after the worker "
        f"recorded it and showed it {shown_after:.0f} ms after"
    )
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
