"""The live regions of the group page and the course overview, rendered once per audience.

When a group, a VM or an operation changes, ``labs.live.events`` asks this module for the
regions that change may touch (after commit, coalesced: ``events.LIVE_COALESCE_SECONDS``)
and pushes their HTML on the events socket; ``static/js/live.js`` swaps them in. One
rendering serves everyone of an audience:

- ``members``: the group page as the group's students see it (sent to ``events.group.<id>``),
- ``staff``: the group page as the course's staff see it — Observe, the buttons the
  deadline does not take away — (to ``events.group.<id>.staff``, which only a staff
  member's socket of that page joins) and the overview (to ``events.course.<id>``).

So nothing in a pushed region may belong to one viewer: its forms are rendered with a
slot for the CSRF token (``labs.live.pagecache.slot``) that a push leaves empty
(``static/js/confirm.js`` adds the page's own, from ``<meta name="csrf-token">``, when a
form is sent) and a page fills with its viewer's, and what is the viewer's own (their
hours) lives in a region that is never pushed (``hours``). A fetched page shows the same
renderings: they are kept in the page cache (``labs.live.pagecache``) until a change
touches them, so a page fetch after a push reads what the push rendered.

``RENDERS`` counts the renderings of this process (bench/live.py reads it).
"""

import time
from collections import Counter
from typing import Any

from django.template.loader import render_to_string

from labs import selectors
from labs.choices import GroupStatus
from labs.compute import clock, firewall, idle, kinds, quotas, term
from labs.forms import GroupEditForm, GroupKeyForm
from labs.live import pagecache
from labs.live.events import MEMBERS, STAFF
from labs.models import Group

# Region key -> its partial. The group page's "hours" is the viewer's own: never pushed.
GROUP_REGIONS = {
    "group-head": "labs/_group_head.html",
    "machines": "labs/_group_machines.html",
    "firewall": "labs/_group_firewall.html",
    "members": "labs/_group_members.html",
    "project": "labs/_group_project.html",
    "edit": "labs/_group_edit.html",
}
# The overview's Usage and Final snapshots change with the clock, not with an event.
COURSE_REGIONS = {
    "counts": "labs/_course_counts.html",
    "groups": "labs/_course_groups.html",
    "hosts": "labs/_course_hosts.html",
    "operations": "labs/_course_operations.html",
}

RENDERS: Counter[str] = Counter()  # "group:members", "group:staff", "course:staff"


def group_context(*, group: Group, staff: bool) -> dict[str, Any]:
    """What the group page's shared regions show to one audience (the view adds the
    viewer's own parts). ``group`` comes with its course, reviewer and members loaded
    (``selectors.group_for_viewer`` / ``selectors.group_for_push``)."""
    context: dict[str, Any] = {
        "group": group,
        "members": list(group.memberships.all()),
        "audience": STAFF if staff else MEMBERS,
        "can_observe": staff,  # access.Action.OBSERVE is granted to the staff roles
    }
    if group.status == GroupStatus.APPROVED:
        vms = selectors.vms_of_group(group=group)
        for vm in vms:  # the buttons each VM offers now, from the catalogue
            vm.card_kinds = kinds.on_vm_card(vm)
            vm.snapshot_kinds = kinds.on_snapshot_row(vm)
            vm.takes_snapshots = kinds.takes_snapshots(vm)
            vm.idle_warning, vm.kept_until = idle.warning_of(vm), idle.kept_until(vm)
        term.page_buttons(vms=vms, staff=staff, course=group.course)
        quota = quotas.group_quota(group=group)
        usage = quotas.group_usage(group=group, vms=vms)
        context.update(
            vms=vms,
            operations=selectors.operations_of_group(group=group),
            outlook=clock.course_outlook(course=group.course),
            term_notice=term.group_notice(course=group.course),
            quota=quota,
            usage=usage,
            left={key: max(quota[key] - usage[key], 0) for key in quota},
            firewall_rules=firewall.rules_of_group(group=group),
            firewall_shown=firewall.shown(group=group),
            firewall_max=firewall.RULES_MAX,
        )
    if not staff:  # the group's students edit it here; the staff in the admin
        if group.is_editable:
            context["edit_form"] = GroupEditForm(
                initial={"project_title": group.project_title, "project_idea": group.project_idea}
            )
        context["key_form"] = GroupKeyForm()  # an approved group's new key takes effect at once
    return context


def _render(templates: dict[str, str], context: dict[str, Any]) -> dict[str, str]:
    context = {**context, **pagecache.slot_context()}
    return {key: render_to_string(name, context) for key, name in templates.items()}


def group_regions(*, group: Group, staff: bool) -> dict[str, str]:
    """The group page's shared regions, as one audience sees them and a push sends them
    (no token in their forms): key -> HTML, rendered now."""
    return _pushed(_group_render(group=group, staff=staff))


def group_parts(*, group: Group, staff: bool, early: str | None) -> dict[str, str]:
    """The same regions with the token's slot, from the page cache while nothing touched
    them (``early``: ``pagecache.group_versions``, read before ``group`` was)."""
    return pagecache.cached(*group_entry(group=group, staff=staff, early=early))


def group_entry(*, group: Group, staff: bool, early: str | None, load=None):
    """(key, seconds, render) of ``group_parts``, for ``pagecache.cached_many``. ``load``
    gives the group with what the rendering reads (``selectors.group_for_push``) when
    ``group`` is only its row's head (``selectors.group_head_for_viewer``)."""
    audience = STAFF if staff else MEMBERS
    key = pagecache.group_key(group, audience, early=early)

    def render() -> dict[str, str]:
        return _group_render(group=load() if load else group, staff=staff)

    return key, pagecache.seconds(), render


def _group_render(*, group: Group, staff: bool) -> dict[str, str]:
    RENDERS[f"group:{STAFF if staff else MEMBERS}"] += 1
    return _render(GROUP_REGIONS, group_context(group=group, staff=staff))


def course_regions(*, course) -> dict[str, str]:
    """The overview's regions as a push sends them (the course's staff), rendered now."""
    return _pushed(_course_render(course=course))


def course_parts(*, course) -> dict[str, str]:
    """The same with the token's slot, from the page cache while nothing touched them."""
    return pagecache.cached(*course_entry(course=course, names=pagecache.course_versions(course)))


def course_entry(*, course, names: str | None):
    """(key, seconds, render) of ``course_parts``, for ``pagecache.cached_many``."""
    key = pagecache.course_key(course, "regions", names=names)
    return key, pagecache.seconds(), lambda: _course_render(course=course)


def _course_render(*, course) -> dict[str, str]:
    RENDERS["course:staff"] += 1
    context = {"course": course, "overview": selectors.course_overview(course=course)}
    return _render(COURSE_REGIONS, context)


def _pushed(regions: dict[str, str]) -> dict[str, str]:
    return {key: pagecache.for_push(html) for key, html in regions.items()}


def render(*, groups: dict[int, list[str]], course_ids: set[int]) -> list[tuple[str, int, dict]]:
    """The pushes for a batch of changes: ("group" | "staff-page" | "course", id, payload)
    each — every group's page for the audiences asked (``MEMBERS``, ``STAFF``), the
    overview of every course asked (``events.regions_flush`` turns them into
    channel-layer messages)."""
    pushes: list[tuple[str, int, dict]] = []
    for group_id in sorted(groups):
        at = time.time()  # what the renderings show was read after this
        early = pagecache.group_versions(group_id)
        group = selectors.group_for_push(group_id=group_id)
        if group is None:  # deleted meanwhile: the pages learn it when they fetch
            continue
        for staff in [audience == STAFF for audience in groups[group_id]]:
            payload = {
                "type": "regions",
                "page": "group",
                "group": group.pk,
                "course": group.course_id,
                "audience": STAFF if staff else MEMBERS,
                "at": at,
                "regions": _pushed(group_parts(group=group, staff=staff, early=early)),
            }
            pushes.append(("staff-page" if staff else "group", group.pk, payload))
    for course in selectors.courses_for_push(course_ids=course_ids):
        at = time.time()
        payload = {
            "type": "regions",
            "page": "course",
            "course": course.pk,
            "audience": STAFF,
            "at": at,
            "regions": _pushed(course_parts(course=course)),
        }
        pushes.append(("course", course.pk, payload))
    return pushes
