"""``{{ pk|id_path:"labs:group_detail" }}``: ``{% url "labs:group_detail" pk %}`` for rows.

The instructor overview links every group and every running VM's console: 150 ``{% url %}``
reversals for 50 groups took about 5 ms of its 30 ms (bench/pages.py). A URL whose only
argument is an id is reversed once per name (and script prefix), then filled in.
"""

import functools

from django import template
from django.urls import NoReverseMatch, get_script_prefix, reverse

register = template.Library()

_SENTINEL = "2147483647"  # an id that stands out in the reversed path


@functools.cache
def _halves(name: str, prefix: str) -> tuple[str, str]:
    try:
        path = reverse(name, args=[int(_SENTINEL)])
    except NoReverseMatch:
        path = ""
    head, found, tail = path.partition(_SENTINEL)
    if not found:
        raise template.TemplateSyntaxError(f"{name} does not take one id argument")
    return head, tail


@register.filter
def id_path(pk, name: str) -> str:
    head, tail = _halves(name, get_script_prefix())
    return f"{head}{int(pk)}{tail}"


_KIND_SENTINEL = "kindsentinel"


@functools.cache
def _op_parts(prefix: str) -> tuple[str, str, str]:
    path = reverse("labs:vm_operation", args=[int(_SENTINEL), _KIND_SENTINEL])
    head, _, rest = path.partition(_SENTINEL)
    middle, _, tail = rest.partition(_KIND_SENTINEL)
    return head, middle, tail


@register.filter
def vm_op_path(pk, kind: str) -> str:
    """``{{ vm.pk|vm_op_path:kind }}``: ``{% url "labs:vm_operation" vm.pk kind %}`` without
    a reversal per button (the group page has a dozen per VM). ``kind``: a catalogue slug."""
    head, middle, tail = _op_parts(get_script_prefix())
    return f"{head}{int(pk)}{middle}{kind}{tail}"
