"""A pushed region's forms in a real browser: the rendering shared by the whole group
carries no CSRF token, and a form in it still posts, with the page's own token
(static/js/confirm.js, from <meta name="csrf-token">)."""

import pytest

from labs.live import regions
from labs.models import Image, Vm, VmTemplate

from .test_group_page_browser import sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SWAP = """([key, html]) => {
  const t = document.createElement('template');
  t.innerHTML = html;
  document.querySelector(`[data-live-region="${key}"]`).replaceWith(t.content.querySelector('[data-live-region]'));
}"""


def test_a_form_swapped_in_from_the_groups_shared_rendering_posts_with_the_pages_own_token(
    live_server, page, alice, group_a, course, make_vm, password
):
    alice.set_password(password)
    alice.save()
    make_vm(group_a, name="vm1", ssh_port=22007)
    VmTemplate.objects.create(course=course, image=Image.objects.get(), quota_vms=2)
    sign_in(page, live_server.url, "alice", password)
    page.goto(f"{live_server.url}/groups/{group_a.pk}/")
    group_a.refresh_from_db()
    shared = regions.group_regions(group=group_a, staff=False)["machines"]
    assert "csrfmiddlewaretoken" not in shared

    page.evaluate(SWAP, ["machines", shared])
    add = page.get_by_role("button", name="Add a VM")
    assert add.evaluate("b => !b.form.querySelector('[name=csrfmiddlewaretoken]')")
    add.click()

    page.get_by_text("vm2 is being created.").wait_for()
    assert Vm.objects.filter(group=group_a, name="vm2").exists()
