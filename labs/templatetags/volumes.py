"""What the volume partials show (templates/labs/_vm_volumes.html, _group_volumes.html),
read from rows the page has: no access decision here, the page's selector made it."""

from django import template

from labs.choices import VolumeState

register = template.Library()


@register.filter
def attachable_to(group, vm) -> list:
    """The group's ready, detached volumes on ``vm``'s host: what its Attach form offers."""
    return [
        v
        for v in group.volumes.all()
        if v.vm_id is None and v.host_id == vm.host_id and v.state == VolumeState.READY
    ]


@register.filter
def with_volumes(snapshots) -> list:
    """The snapshots that hold volumes' contents (taken while volumes were attached)."""
    return [s for s in snapshots if s.volumes]
