"""``{{ moment|clock }}``: "14:03" today, "Dec 5, 14:03" on another day (``labs.models.clock``),
in the current time zone, like every other time on the pages."""

from django import template

from labs.models import clock as _clock

register = template.Library()


@register.filter
def clock(moment) -> str:
    return _clock(moment) if moment else ""
