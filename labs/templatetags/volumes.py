"""What the volume partials show (templates/labs/_vm_volumes.html, _group_volumes.html),
read from rows the page has: no access decision here, the page's selector made it.

The group's volumes are read once per page (one query, kept on the group object for the
request), however many VMs the group has.
"""

from django import template

from labs.choices import VolumeState
from labs.compute.volumes import volumes_of_group

register = template.Library()


@register.filter
def group_volumes(group) -> list:
    """Every volume of the group, by name, with its host and VM (one query per page)."""
    cached = getattr(group, "_page_volumes", None)
    if cached is None:
        cached = group._page_volumes = volumes_of_group(group=group)
    return cached


@register.filter
def attached_to(group, vm) -> list:
    return [v for v in group_volumes(group) if v.vm_id == vm.pk]


@register.filter
def attachable_to(group, vm) -> list:
    """The group's ready, detached volumes on ``vm``'s host: what its Attach form offers."""
    return [
        v
        for v in group_volumes(group)
        if v.vm_id is None and v.host_id == vm.host_id and v.state == VolumeState.READY
    ]


@register.filter
def with_volumes(snapshots) -> list:
    """The snapshots that hold volumes' contents (taken while volumes were attached)."""
    return [s for s in snapshots if s.volumes]
