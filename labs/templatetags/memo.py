"""``{% memo "name" a b %}…{% endmemo %}``: a fragment rendered once per distinct inputs.

The overview renders a row per group and per operation, and is rendered again for every
push (labs/live/regions.py) and page load; between two renderings most rows did not
change. A memo keeps each rendered fragment in this process, keyed by the fragment's
name, the ``repr`` of its inputs, the time zone and today's date (``|clock`` prints the
day when it is not today) and the script prefix (the paths in it). So what is inside must
depend on the named inputs alone: give it values with a faithful ``repr`` (the
selectors' frozen dataclasses), never model instances (their ``repr`` is their name) or
"time since".
"""

import threading
from collections import Counter, OrderedDict

from django import template
from django.urls import get_script_prefix
from django.utils import timezone

register = template.Library()

LIMIT = 20_000  # fragments kept per process (a 200-group overview keeps about 250)
STATS: Counter[str] = Counter()  # "hit", "miss"

_kept: OrderedDict[tuple, str] = OrderedDict()
_lock = threading.Lock()


class MemoNode(template.Node):
    def __init__(self, nodelist, name: str, inputs) -> None:
        self.nodelist, self.name, self.inputs = nodelist, name, inputs

    def render(self, context) -> str:
        key = (
            self.name,
            timezone.get_current_timezone_name(),
            timezone.localdate(),
            get_script_prefix(),
            *(repr(value.resolve(context)) for value in self.inputs),
        )
        with _lock:
            kept = _kept.get(key)
            if kept is not None:
                _kept.move_to_end(key)
                STATS["hit"] += 1
                return kept
        rendered = self.nodelist.render(context)
        with _lock:
            STATS["miss"] += 1
            _kept[key] = rendered
            while len(_kept) > LIMIT:
                _kept.popitem(last=False)
        return rendered


@register.tag
def memo(parser, token):
    bits = token.split_contents()
    if len(bits) < 3:
        raise template.TemplateSyntaxError("{% memo %} takes a name and at least one input")
    nodelist = parser.parse(("endmemo",))
    parser.delete_first_token()
    return MemoNode(nodelist, bits[1], [parser.compile_filter(bit) for bit in bits[2:]])


def forget() -> None:
    """Drop every kept fragment (tests: rows of another test can have the same values)."""
    with _lock:
        _kept.clear()
