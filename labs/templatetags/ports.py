"""What the published-ports partial shows (templates/labs/_vm_ports.html), read from rows
the page has: no access decision here, the page's selector made it.

The group's publications are read once per page (one query, kept on the group object for
the request), however many VMs the group has.
"""

from django import template

from labs.compute.ports import publications_of_group

register = template.Library()


@register.filter
def group_publications(group) -> list:
    cached = getattr(group, "_page_publications", None)
    if cached is None:
        cached = group._page_publications = publications_of_group(group=group)
    return cached


@register.filter
def published_on(group, vm) -> list:
    """The VM's publications, each with the page's VM row (its state says open/closed)."""
    found = [p for p in group_publications(group) if p.vm_id == vm.pk]
    for publication in found:
        publication.vm = vm
    return found


@register.filter
def ports_left(group) -> int:
    """How many more ports the group may publish (the course's quota less what it has)."""
    return max(group.course.published_ports_per_group - len(group_publications(group)), 0)
