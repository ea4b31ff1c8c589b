"""The group page in a phone-sized window, with the keyboard only: the SSH line's copy
button is reached with Tab, shows where the focus is, and copies the exact line."""

import pytest

from labs.models import Host, Image, VmTemplate

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NARROW = {"width": 360, "height": 740}


@pytest.fixture
def narrow_page(browser, live_server):
    context = browser.new_context(viewport=NARROW, is_mobile=False)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def sign_in(page, url: str, username: str, password: str) -> None:
    page.goto(url + "/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/accounts/login/" not in u)


def test_a_member_on_a_phone_tabs_to_the_copy_button_and_copies_the_ssh_line(
    live_server, narrow_page, alice, group_a, course, make_vm, password, artifacts
):
    alice.set_password(password)
    alice.save()
    vm = make_vm(group_a, name="vm1", ssh_port=22007)
    Host.objects.filter(pk=vm.host_id).update(ssh_address="lab.example.edu")
    VmTemplate.objects.create(course=course, image=Image.objects.get(), quota_vms=2)
    page = narrow_page
    sign_in(page, live_server.url, "alice", password)
    page.goto(f"{live_server.url}/groups/{group_a.pk}/")

    # Nothing scrolls sideways at 360 px, tables included.
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    assert page.get_by_text("1 of 2 VMs left").is_visible()

    # Keyboard only: Tab until the copy button has the focus.
    copy = page.get_by_role("button", name="Copy the SSH command of vm1")
    for _ in range(30):
        page.keyboard.press("Tab")
        if copy.evaluate("button => document.activeElement === button"):
            break
    else:
        pytest.fail("the copy button is not reachable with Tab")
    outline = copy.evaluate(
        "b => { const s = getComputedStyle(b); return [s.outlineStyle, s.outlineWidth]; }"
    )
    assert outline[0] != "none" and float(outline[1].removesuffix("px")) >= 2
    page.screenshot(path=str(artifacts / "group-page-360.png"), full_page=True)

    page.keyboard.press("Enter")
    page.get_by_role("status").filter(has_text="Copied to the clipboard.").wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == "ssh -p 22007 student@lab.example.edu"
    assert copy.inner_text() == "Copied"
