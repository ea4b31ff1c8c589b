"""Who may open a VM's console right now, where its VNC server is, and the session audit.

The console consumer calls these (through ``database_sync_to_async``) after it has taken
the ticket: the ticket says who asked a few seconds ago; these say whether that is still
true now, from the database, never from libvirt.
"""

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from labs.choices import STAFF_ROLES, DesiredState, GroupStatus, ObservedState, Role
from labs.models import ConsoleSession, Host, Membership, Vm


class ConsoleDenied(Exception):
    """The console must not open; the message is for the server log only."""


@dataclass(frozen=True)
class VncEndpoint:
    """A VNC server the web process can reach: a loopback TCP port or a unix socket."""

    host: str = ""
    port: int | None = None
    socket: str = ""


@dataclass(frozen=True)
class ConsoleTarget:
    vm_id: int
    endpoint: VncEndpoint
    is_course_staff: bool


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local(host: Host) -> bool:
    """Whether the web process reaches the host's loopback as its own.

    A libvirt URI naming a remote server (``qemu+ssh://hv2/system``) means the recorded
    loopback endpoint is the *hypervisor's* loopback: connecting to it here would reach
    whatever listens on this machine's port, possibly another VM. Such hosts need a
    tunnel mapping first (docs/console.md, "Remote hypervisors").
    """
    server = urlsplit(host.uri).hostname
    return server is None or _is_loopback(server)


def vnc_endpoint_of(*, vm: Vm) -> VncEndpoint:
    """The VM's VNC endpoint as its worker last recorded it; ConsoleDenied if unusable.

    Only a unix socket or a loopback port of a host whose loopback is ours: a remote
    hypervisor's console is reached through a tunnel, never across the network.
    """
    if vm.host is None or not _is_local(vm.host):
        raise ConsoleDenied("VM's host is remote: no console tunnel configured")
    if vm.vnc_socket:
        if not vm.vnc_socket.startswith("/"):
            raise ConsoleDenied("VNC socket path is not absolute")
        return VncEndpoint(socket=vm.vnc_socket)
    if vm.vnc_host and vm.vnc_port:
        if not _is_loopback(vm.vnc_host):
            raise ConsoleDenied("VNC endpoint is not on loopback")
        return VncEndpoint(host=vm.vnc_host, port=vm.vnc_port)
    raise ConsoleDenied("VM has no VNC endpoint")


def console_target_for(*, user_id: int, vm_id: int, view_only: bool) -> ConsoleTarget:
    """Check, now, that this user may open this VM's console in this mode.

    Students: a student member of the VM's group, and the group is approved. Course
    staff (instructor, TA) and superusers: any VM of their courses, driving or
    view-only; view-only tickets are only ever for staff. The VM must be running (as
    last observed) and not being deleted, with a usable VNC endpoint.
    """
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise ConsoleDenied("user missing or inactive")
    vm = Vm.objects.select_related("group", "host").filter(pk=vm_id).first()
    if vm is None:
        raise ConsoleDenied("no such VM")
    is_staff = (
        user.is_superuser
        or Membership.objects.filter(
            user_id=user_id, course_id=vm.group.course_id, role__in=STAFF_ROLES
        ).exists()
    )
    if not is_staff:
        if view_only:
            raise ConsoleDenied("view-only ticket for a non-staff user")
        is_member = Membership.objects.filter(
            user_id=user_id, group_id=vm.group_id, role=Role.STUDENT
        ).exists()
        if not is_member:
            raise ConsoleDenied("not a member of the VM's group")
        if vm.group.status != GroupStatus.APPROVED:
            raise ConsoleDenied("group is not approved")
    if vm.desired_state == DesiredState.DELETED:
        raise ConsoleDenied("VM is being deleted")
    if vm.observed_state != ObservedState.RUNNING:
        raise ConsoleDenied("VM is not running")
    return ConsoleTarget(vm_id=vm.pk, endpoint=vnc_endpoint_of(vm=vm), is_course_staff=is_staff)


def console_session_start(*, user_id: int, vm_id: int, view_only: bool) -> int:
    """The audit row of a console session as it opens; returns its id."""
    return ConsoleSession.objects.create(user_id=user_id, vm_id=vm_id, view_only=view_only).pk


def console_session_end(
    *, session_id: int, bytes_to_vm: int, bytes_from_vm: int, close_reason: str
) -> None:
    ConsoleSession.objects.filter(pk=session_id).update(
        ended_at=timezone.now(),
        bytes_to_vm=bytes_to_vm,
        bytes_from_vm=bytes_from_vm,
        close_reason=close_reason[:100],
    )


aconsole_target_for = database_sync_to_async(console_target_for)
aconsole_session_start = database_sync_to_async(console_session_start)
aconsole_session_end = database_sync_to_async(console_session_end)
