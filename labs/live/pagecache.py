"""Rendered parts of the group page and the overview, kept between the changes that touch
them (issue #14, cheap pages).

A page fetch asks for parts that only change when something happens: the group page's
shared regions per audience (what ``labs.live.regions`` pushes) and the overview's
regions, bulk form, final snapshots and usage. They are kept in the cache (Redis, shared
by the web processes and the workers) under keys that carry **versions**:

- ``g<group>``: the group's own (its row, members, VMs, snapshots, volumes, published
  ports, operations),
- ``o<course>``: any group of the course (the overview shows all of them),
- ``c<course>``: the course's own (its dates, template, schedule),
- ``all``: what every page may show (hosts, images, people's names),
- ``gen``: everything (``forget``).

A change gives each version it touches a new random value, so a key stored before it is
never read again. Changes are seen twice: by ``labs.live.events`` (every event a service
announces) and by ``post_save``/``post_delete`` of the models the pages show; both bump
now, for the transaction's own reads, and again after commit, so that a page rendered
by another process between the write and the commit cannot outlive it. What
changes with the clock alone (a queued operation's wait, an idle warning's hour, the
usage hours) is bounded by the parts' lifetimes: ``PAGE_CACHE_SECONDS`` (30 s) and 60 s
for hours, counted on the site's clock (``span``).

A cached part holds no viewer's CSRF token: it is rendered with ``slot()`` in the token's
place, and each page puts its own viewer's token in (``for_page``); a push takes the slot
out (``for_push``; confirm.js adds the page's token when a form is sent).
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.template import Context, Template
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

log = logging.getLogger(__name__)

# Tests give each test its own (as for the throttle's counters); a deployment may set
# PAGE_CACHE_PREFIX when two sites share one Redis.
PREFIX = getattr(settings, "PAGE_CACHE_PREFIX", "stratus:pages:")
HOURS_SECONDS = 60
# A version outlives every part stored under it (parts live a minute at most); then it
# may go: a version made anew is only a miss. So nothing the cache holds is kept forever.
VERSION_SECONDS = 3600

# What the token stands for in a cached rendering: a string no escaped text can contain
# (it is the whole <input>, and text in a page has its "<" escaped).
_SLOT_VALUE = "stratus-csrf-slot"


@functools.cache
def _token_tag() -> Template:
    return Template("{% csrf_token %}")


def token_input(token: str) -> str:
    """What ``{% csrf_token %}`` renders for this token."""
    return _token_tag().render(Context({"csrf_token": token}))


def slot() -> str:
    """What stands for the token in a cached rendering."""
    return token_input(_SLOT_VALUE)


def slot_context() -> dict[str, str]:
    """The context entry that renders ``{% csrf_token %}`` as the slot."""
    return {"csrf_token": _SLOT_VALUE}


def for_page(html: str, token: str) -> SafeString:
    """A cached part with this viewer's token in its forms."""
    return mark_safe(html.replace(slot(), token_input(token)))  # noqa: S308 - our rendering


def for_push(html: str) -> str:
    """A cached part for everyone of its audience: its forms carry no token."""
    return html.replace(slot(), "")


# --- versions ----------------------------------------------------------------------------


def _key(name: str) -> str:
    return f"{PREFIX}v:{name}"


def versions(*names: str) -> str | None:
    """The current versions of these names, as one key part (a missing one is made);
    None when the cache does not answer (then nothing is cached). ``gen`` is in every
    key: ``forget`` bumps it."""
    keys = [_key(name) for name in ("gen", *names)]
    found = _call(cache.get_many, keys)
    if found is None:
        return None
    missing = [key for key in keys if key not in found]
    for key in missing:  # add: a concurrent first reader's value wins
        _call(cache.add, key, secrets.token_hex(6), VERSION_SECONDS)
    if missing:
        found.update(_call(cache.get_many, missing) or {})
    if len(found) < len(keys):
        return None
    return ".".join(str(found[key]) for key in keys)


def bump(*names: str) -> None:
    """What these names version changed: every part stored under them is out of date."""
    tokens = {_key(name): secrets.token_hex(6) for name in names}
    _call(cache.set_many, tokens, VERSION_SECONDS)


def forget() -> None:
    """Every part stored so far is out of date (the tests start each test so)."""
    bump("gen")


def group_changed(*, group_id: int | None, course_id: int | None) -> None:
    """Called by ``labs.live.events`` for every event, when the service announces it (in
    its transaction: the transaction's own reads) and after commit (everyone's)."""
    bump(*_group_names(group_id, course_id))


def vm_changed(*, vm_id: int) -> None:
    """An event about one VM (or one of its operations), in the service's transaction."""
    from labs.models import Vm

    row = Vm.objects.filter(pk=vm_id).values_list("group_id", "group__course_id").first()
    if row is not None:
        group_changed(group_id=row[0], course_id=row[1])


def _group_names(group_id: int | None, course_id: int | None) -> list[str]:
    names = []
    if group_id is not None:
        names.append(f"g{group_id}")
    if course_id is not None:
        names.append(f"o{course_id}")
    return names


# --- the parts ---------------------------------------------------------------------------


def cached(key: str | None, seconds: int, render: Callable[[], Any]) -> Any:
    """The part under ``key``, rendered and kept for ``seconds`` when missing. With no
    key (the versions could not be read) or a cache that does not answer, it is
    rendered every time: the page is slower, never wrong."""
    if key is None or seconds <= 0:
        return render()
    key = f"{PREFIX}p:{key}"
    hit = _call(cache.get, key)
    if hit is not None:
        return hit
    part = render()
    _call(cache.set, key, part, seconds)
    return part


def cached_many(parts: dict[str, tuple[str | None, int, Callable[[], Any]]]) -> dict[str, Any]:
    """Several parts in one round trip: name -> (key, seconds, render), as ``cached``."""
    keys = {name: f"{PREFIX}p:{key}" for name, (key, ttl, _) in parts.items() if key and ttl > 0}
    hits = _call(cache.get_many, list(keys.values())) if keys else {}
    found = {}
    for name, (_, ttl, render) in parts.items():
        hit = (hits or {}).get(keys[name]) if name in keys else None
        if hit is None:
            hit = render()
            if name in keys:
                _call(cache.set, keys[name], hit, ttl)
        found[name] = hit
    return found


def group_versions(group_id: int) -> str | None:
    """Read before the group is: a change that commits after this read has bumped a
    version this key does not carry."""
    return versions(f"g{group_id}", "all")


def span(seconds: int) -> int:
    """Which ``seconds``-long span of the site's clock this is: every key carries it, so
    that a part is reused within one span of the clock the pages are computed with
    (``timezone.now``, which tests move) and no longer."""
    return int(timezone.now().timestamp() // max(seconds, 1))


def group_key(group, audience: str, *, early: str | None) -> str | None:
    """The key of a group page's shared regions for one audience (``early``: the
    ``group_versions`` read before the group). ``updated_at`` makes a row saved (or a
    new row under a reused id) a new key even before any bump."""
    course = versions(f"c{group.course_id}")
    if early is None or course is None:
        return None
    at = group.updated_at.timestamp()
    return f"group:{group.pk}:{at}:{audience}:{early}:{course}:{span(seconds())}"


def course_versions(course) -> str | None:
    """What the overview's keys carry (read once per page)."""
    return versions(f"o{course.pk}", f"c{course.pk}", "all")


def course_key(course, part: str, *, names: str | None) -> str | None:
    """The key of one part of the overview (``names``: ``course_versions``)."""
    if names is None:
        return None
    ttl = HOURS_SECONDS if part == "usage" else seconds()
    return f"course:{course.pk}:{course.created_at.timestamp()}:{part}:{names}:{span(ttl)}"


def seconds() -> int:
    return settings.PAGE_CACHE_SECONDS


# --- model changes -----------------------------------------------------------------------


# The models the pages show, each with the versions a saved or deleted row of it touches
# (``connect`` fills it once the models are loaded).
_WATCHED: dict[type, Callable[[Any], list[str]]] = {}


def _watched() -> dict[type, Callable[[Any], list[str]]]:
    from django.contrib.auth import get_user_model

    from labs.models import (
        ClassHoliday,
        ClassSession,
        Course,
        FirewallRule,
        Group,
        Host,
        Image,
        ImageCopy,
        Membership,
        Publication,
        Snapshot,
        StateChange,
        Vm,
        VmTemplate,
        Volume,
    )

    def of_group(row) -> list[str]:  # a row of a group: its page and its course's
        return _group_names(row.group_id, _course_of(row.group_id))

    def of_vm(row) -> list[str]:  # a row of a VM: its group's (StateChange: the hours)
        group_id = Vm.objects.filter(pk=row.vm_id).values_list("group_id", flat=True).first()
        return _group_names(group_id, _course_of(group_id))

    def of_course(row) -> list[str]:
        return [f"c{row.course_id}"]

    def everything(row) -> list[str]:
        return ["all"]

    return {
        Group: lambda row: _group_names(row.pk, row.course_id),
        Membership: lambda row: [*_group_names(row.group_id, None), f"o{row.course_id}"],
        Vm: of_group,
        Volume: of_group,
        FirewallRule: of_group,
        Snapshot: of_vm,
        StateChange: of_vm,
        Publication: of_vm,
        Course: lambda row: [f"c{row.pk}", f"o{row.pk}"],
        VmTemplate: of_course,
        ClassSession: of_course,
        ClassHoliday: of_course,
        Host: everything,
        Image: everything,
        ImageCopy: everything,
        get_user_model(): everything,
    }


def _course_of(group_id: int | None) -> int | None:
    from labs.models import Group

    if group_id is None:
        return None
    return Group.objects.filter(pk=group_id).values_list("course_id", flat=True).first()


def _on_change(sender, instance, **kwargs) -> None:
    if kwargs.get("raw"):  # fixtures being loaded
        return
    if sender.__name__ == "User" and kwargs.get("update_fields") == frozenset({"last_login"}):
        return  # a sign-in changes nothing a page shows
    touched = _WATCHED.get(sender)
    names = touched(instance) if touched else []
    if not names:
        return
    bump(*names)  # this transaction's own later reads
    transaction.on_commit(lambda: bump(*names), robust=True)  # everyone's, once visible


def connect() -> None:
    """Watch the models the pages show (``labs.apps`` calls it once)."""
    _WATCHED.update(_watched())
    for model in _WATCHED:
        uid = f"pagecache-{model._meta.label_lower}"
        post_save.connect(_on_change, sender=model, dispatch_uid=f"{uid}-save")
        post_delete.connect(_on_change, sender=model, dispatch_uid=f"{uid}-delete")


# --- the cache, never failing the page ---------------------------------------------------


def _call(function, *args):
    try:
        return function(*args)
    except Exception as error:  # Redis away: pages render from the database
        log.warning("page cache unavailable (%s)", type(error).__name__)
        return None
