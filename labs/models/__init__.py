"""The labs app's models, one module per part of the domain; everything is importable from
``labs.models`` as before (migrations name ``labs.models.validate_libvirt_uri`` and
``labs.models._default_time_zone``).

- ``courses``: Course, Group, Membership
- ``hosts``: Host, Image, VmTemplate
- ``images``: ImageCopy (which host holds which imported or captured image)
- ``vms``: Vm, Snapshot, ConsoleSession, the state history, archives
- ``operations``: Operation and how the pages name who asked and why it waits
- ``schedule``: the course clock's classes, holidays and the actions it took
- ``volumes``: a group's block volumes
- ``ports``: published ports (a guest port forwarded from its host's address)
- ``networks``: a group's private network (subnet, VNI)
- ``firewall``: the inbound rules of a group's network
"""

from labs.models.courses import Course, Group, Membership, _default_time_zone
from labs.models.firewall import FirewallRule
from labs.models.hosts import Host, Image, VmTemplate, clock
from labs.models.images import ImageCopy
from labs.models.networks import GroupNetwork
from labs.models.operations import (
    WAIT_NOTICE_SECONDS,
    Operation,
    requester_label,
    waiting_note,
)
from labs.models.ports import Publication
from labs.models.schedule import ClassHoliday, ClassSession, ClockAction
from labs.models.vms import ConsoleSession, Snapshot, StateChange, Vm, VmArchive, VmQuerySet
from labs.models.volumes import Volume
from labs.validators import validate_libvirt_uri

__all__ = [
    "WAIT_NOTICE_SECONDS",
    "ClassHoliday",
    "ClassSession",
    "ClockAction",
    "ConsoleSession",
    "Course",
    "FirewallRule",
    "Group",
    "GroupNetwork",
    "Host",
    "Image",
    "ImageCopy",
    "Membership",
    "Operation",
    "Publication",
    "Snapshot",
    "StateChange",
    "Vm",
    "VmArchive",
    "VmQuerySet",
    "VmTemplate",
    "Volume",
    "_default_time_zone",
    "clock",
    "requester_label",
    "validate_libvirt_uri",
    "waiting_note",
]
