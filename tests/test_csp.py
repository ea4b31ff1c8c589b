"""The Content-Security-Policy (portal/settings.py SECURE_CSP, Django's own middleware).

Scripts and styles come only from the site's static files, so a page may carry no inline
script, handler or style: these tests hold the header and the templates to that, and
tests/e2e/test_csp_browser.py loads the pages in Chromium under the policy.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "templates").rglob("*.html"))

INLINE = {
    "an on…= handler": re.compile(r"<[^>]*\son[a-z]+\s*=", re.IGNORECASE),
    "an inline <script>": re.compile(
        r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")", re.IGNORECASE
    ),
    "a <style> element": re.compile(r"<style\b", re.IGNORECASE),
    "a style= attribute": re.compile(r"<[^>]*\sstyle\s*=", re.IGNORECASE),
    "a javascript: URL": re.compile(r"javascript:", re.IGNORECASE),
}


def policy_of(response) -> dict[str, list[str]]:
    header = response.headers["Content-Security-Policy"]
    directives = [part.split() for part in header.split(";") if part.strip()]
    return {name: values for name, *values in directives}


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/", "/healthz"])
def test_every_response_carries_a_policy_that_allows_no_inline_script_or_style(client, path):
    policy = policy_of(client.get(path))

    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == policy["base-uri"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]  # as X-Frame-Options: DENY
    assert policy["form-action"] == ["'self'"]
    assert "'unsafe-inline'" not in str(policy) and "'unsafe-eval'" not in str(policy)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_template_has_an_inline_script_handler_or_style(template):
    text = template.read_text()
    found = [what for what, pattern in INLINE.items() if pattern.search(text)]
    assert not found, f"{template.relative_to(ROOT)} has {', '.join(found)}"


def test_the_template_scan_would_see_an_inline_handler():
    assert INLINE["an on…= handler"].search('<form class="inline" onsubmit="return confirm()">')
    assert INLINE["a style= attribute"].search('<p\n   style="color: red">')
    assert not INLINE["an inline <script>"].search('<script src="/static/js/live.js" defer>')


def test_a_destructive_button_asks_through_data_confirm_and_the_static_script(
    client_for, alice, group_a, make_vm
):
    vm = make_vm(group_a, name="vm1")

    page = client_for(alice).get(f"/groups/{group_a.pk}/").content.decode()

    reset = re.search(rf'<form[^>]*action="/vms/{vm.pk}/reset/"[^>]*>', page)
    assert reset, "the group page offers no reset"
    assert 'data-confirm="Reset erases the disk' in reset[0]
    assert "onsubmit" not in page
    assert re.search(r'<script src="/static/js/confirm\.js" defer></script>', page)
