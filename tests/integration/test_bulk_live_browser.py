"""Acceptance test of the instructor's bulk actions (issue #5) on the real stack.

Three groups, each with a real QEMU guest provisioned by a real Celery worker. The
instructor ticks the three groups on the course overview and queues "Shut down"; one
Operation per VM goes through the worker, and each group's page, open in a member's
browser and never reloaded, shows its VM stop.
"""

import re
import secrets

import pytest
from django.db import connection, connections

from labs.choices import ObservedState, OperationKind, OperationStatus
from labs.models import Operation, VmTemplate

from ..e2e.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from .conftest import Worker, approve_new_group, child_db_env, live, sign_in, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STOP_TIMEOUT_MS = 120_000  # three guests shut down one after another on two TCG cores


@pytest.fixture
def quick_worker(transactional_db):
    """A worker that gives a guest 5 s to shut down before forcing it off: the guests here
    are still booting, and ACPI means nothing to a kernel that has not started yet."""
    worker = Worker(connection.settings_dict["NAME"], child_db_env())
    worker.start(VM_SHUTDOWN_TIMEOUT="5")
    yield worker
    worker.stop()


@pytest.mark.sqlite_pass_only  # live pages: Redis and the browser, not the database
def test_an_instructor_bulk_stops_three_groups_and_each_group_page_shows_its_vm_stop(
    course,
    alice,
    carol,
    dave,
    ines,
    qemu_host,
    base_image,
    quick_worker,
    asgi_server,
    server_channels,
    make_public_key,
    monkeypatch,
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM beside Playwright's loop
    from labs.models import Image

    image = Image.objects.create(
        name="debian-12", os="Debian 12", login_user="student", path=str(base_image), size_gib=2
    )
    VmTemplate.objects.create(
        course=course, image=image, count=1, vcpus=1, memory_mib=512, disk_gib=4
    )
    password = secrets.token_urlsafe(12)
    for user in (alice, carol, dave, ines):
        user.set_password(password)
        user.save()
    members = {"Alpha": alice, "Bravo": carol, "Charlie": dave}
    vms = {}
    for name, member in members.items():
        vm, provision = approve_new_group(
            course, by=member, reviewer=ines, name=name, public_key=make_public_key(name)
        )
        vms[name] = (vm, provision)
    for _vm, provision in vms.values():
        wait_operation(provision, timeout=180)

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pages = {}
            for name, member in members.items():
                page = sign_in(browser, asgi_server, member, password)
                page.goto(f"{asgi_server.url}/groups/{vms[name][0].group_id}/")
                live(page)
                page.locator(f"#vm-{vms[name][0].pk} h3 .badge", has_text="Running").wait_for()
                page.evaluate("window.__noReload = 1")
                pages[name] = page

            overview = sign_in(browser, asgi_server, ines, password)
            overview.goto(f"{asgi_server.url}/courses/{course.slug}/overview/")
            for name in members:
                overview.get_by_label(name, exact=True).check()
            overview.get_by_label("Shut down").check()
            overview.get_by_role("button", name="Queue the operations").click()
            overview.get_by_text("Queued 3 operations.").wait_for()

            # Each group's page, never reloaded, shows its VM stopped.
            for name, page in pages.items():
                vm = vms[name][0]
                page.locator(f"#vm-{vm.pk} h3 .badge", has_text="Stopped").wait_for(
                    timeout=STOP_TIMEOUT_MS
                )
                assert page.evaluate("window.__noReload") == 1
            # The overview, live as well, counts them stopped.
            live(overview)
            overview.locator("[data-live-region=counts]").get_by_text("3 stopped").wait_for()
            # Its announcements name the group: every group here has a vm1.
            said = overview.locator("[data-live-announce]").inner_text()
            assert re.fullmatch(r"Shut down of (Alpha|Bravo|Charlie)/vm1 succeeded", said), said
            ARTIFACTS.mkdir(exist_ok=True)
            pages["Bravo"].screenshot(path=str(ARTIFACTS / "bulk-stop-group-page.png"))
            overview.screenshot(path=str(ARTIFACTS / "bulk-stop-overview.png"), full_page=True)
            browser.close()
        finally:
            connections.close_all()  # the ORM connection made beside Playwright's loop

    stops = Operation.objects.filter(kind=OperationKind.STOP)
    assert sorted(stops.values_list("vm__group__name", "requested_by__username", "status")) == [
        (name, "ines", OperationStatus.SUCCEEDED) for name in members
    ]
    for vm, _ in vms.values():
        vm.refresh_from_db()
        assert vm.observed_state == ObservedState.SHUTOFF
