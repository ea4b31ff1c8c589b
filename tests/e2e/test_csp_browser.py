"""Every page in Chromium under the site's Content-Security-Policy (portal/settings.py):
nothing is refused, and the confirmation a destructive button asks for
(static/js/confirm.js reading data-confirm, no inline handler) still guards the form."""

import pytest
from django.contrib.auth import get_user_model

from labs.compute import dispatch
from labs.models import Operation

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Registered before any page script runs: every refusal the policy makes, as text.
WATCH_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.effectiveDirective} blocked ${e.blockedURI || "inline"}`
                    + ` at ${e.sourceFile}:${e.lineNumber}`);
});
"""


@pytest.fixture
def sent(monkeypatch):
    """Operations the site hands to Celery, recorded instead of sent (the live server
    runs in this process)."""
    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "")
    return ids


@pytest.fixture
def watched(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.add_init_script(WATCH_VIOLATIONS)
    page = context.new_page()
    page.set_default_timeout(15_000)
    console = []
    page.on("console", lambda message: console.append(message.text))
    page.console_lines = console
    yield page
    context.close()


def violations(page) -> list[str]:
    page.wait_for_timeout(300)  # reports are queued as tasks: let them arrive
    reported = page.evaluate("window.__csp")
    logged = [line for line in page.console_lines if "Content Security Policy" in line]
    return reported + logged


def sign_in(page, url, username, password):
    page.goto(url + "/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/accounts/login/" not in u)


def test_the_student_pages_load_under_the_policy_without_a_refusal(
    live_server, watched, alice, group_a, make_vm, password
):
    alice.set_password(password)
    alice.save()
    vm = make_vm(group_a, name="vm1")
    page = watched

    page.goto(live_server.url + "/accounts/login/")
    header = page.request.get(live_server.url + "/accounts/login/").headers
    assert "script-src 'self'" in header["content-security-policy"]
    # The stylesheet applies (a blocked one would leave the browser's defaults).
    assert page.locator(".topbar").evaluate("e => getComputedStyle(e).display") == "flex"
    assert violations(page) == []

    sign_in(page, live_server.url, "alice", password)
    page.goto(f"{live_server.url}/groups/{group_a.pk}/")
    page.get_by_role("heading", level=1, name="Alpha").wait_for()
    # live.js ran and opened its events socket (same origin: 'self' covers ws:).
    page.locator("html.js-copy").wait_for(state="attached")
    assert violations(page) == []

    # The console page: console.js and noVNC's modules load, the ticket POST is sent.
    with page.expect_response(lambda r: "/console/ticket" in r.url):
        page.goto(f"{live_server.url}/vms/{vm.pk}/console/")
    assert violations(page) == []


def test_the_admin_loads_under_the_policy_without_a_refusal(
    live_server, watched, group_a, password
):
    get_user_model().objects.create_superuser("root", "root@example.edu", password)
    page = watched
    page.goto(live_server.url + "/admin/login/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(live_server.url + "/admin/")
    # The admin's stylesheets apply (blocked, #header would keep the browser's defaults).
    assert page.locator("#header").evaluate("e => getComputedStyle(e).display") == "flex"
    for path in ("/admin/labs/group/", f"/admin/labs/group/{group_a.pk}/change/"):
        page.goto(live_server.url + path)
    page.goto(live_server.url + "/admin/labs/host/add/")
    assert violations(page) == []


def test_a_destructive_button_asks_first_and_cancel_sends_nothing(
    live_server, watched, alice, group_a, make_vm, password, sent
):
    alice.set_password(password)
    alice.save()
    vm = make_vm(group_a, name="vm1")
    page = watched
    sign_in(page, live_server.url, "alice", password)
    page.goto(f"{live_server.url}/groups/{group_a.pk}/")
    reset = page.locator(f'form[action="/vms/{vm.pk}/reset/"] button')
    questions = []

    def answer(accept):
        def handle(dialog):
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return handle

    page.once("dialog", answer(False))
    reset.click()
    page.wait_for_timeout(500)
    assert questions and questions[0].startswith("Reset erases the disk")
    assert not Operation.objects.exists() and sent == []

    page.once("dialog", answer(True))
    reset.click()
    page.get_by_text("of vm1 is queued.").wait_for()
    assert list(Operation.objects.values_list("kind", flat=True)) == ["reset"]
    assert len(questions) == 2
    assert violations(page) == []
