"""The console session rules both transports share, defined once.

- how a connection brings its ticket (one ``stratus.ticket.<token>`` subprotocol);
- what binds a ticket (its user, its browser session, its VM);
- who may open a VM's console right now and where its VNC server is (``target_for``:
  the access policy, re-read from the database, never from libvirt);
- the limits (idle, session length) and the close codes a session ends with, which the
  console page gets from ``client_config`` instead of a copy in its JS;
- the audit row of each session.

``labs.consoles.channels`` (the web process) and ``labs.consoles.websockify`` (beside a
hypervisor) are two thin transports over these.
"""

import ipaddress
import secrets
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from labs import access
from labs.choices import DesiredState, ObservedState, OperationKind, OperationStatus
from labs.consoles.tickets import SUBPROTOCOL_PREFIX, Ticket, session_hash
from labs.consoles.tunnel import SshRoute
from labs.models import ConsoleSession, Host, Vm


class CloseCode(IntEnum):
    """Websocket close codes after accept (a refusal before accept is a bare close)."""

    NORMAL = 1000  # the VNC server closed the connection
    PROTOCOL_ERROR = 1002  # view-only: the client sent something that is not RFB
    UNSUPPORTED = 1003  # a text frame
    TOO_BIG = 1009  # a frame over CONSOLE_MAX_FRAME
    SERVER_ERROR = 1011
    REVOKED = 4001  # the VM stopped, was reset or deleted; access removed
    IDLE = 4002  # no input for CONSOLE_IDLE_TIMEOUT
    SESSION_LIMIT = 4003  # CONSOLE_MAX_SESSION reached
    MOVED = 4004  # the VM moved live to another host: connect again (reason "moved to <host>")


# What the console page says for each code (sent to the page by client_config).
CLOSE_REASONS = {
    CloseCode.PROTOCOL_ERROR: "the browser sent something the console does not accept",
    CloseCode.UNSUPPORTED: "the browser sent something the console does not accept",
    CloseCode.TOO_BIG: "a message was too large",
    CloseCode.SERVER_ERROR: "the console hit an error",
    CloseCode.REVOKED: "access ended (the VM stopped or changed, or your access changed)",
    CloseCode.IDLE: "closed after a long time without input",
    CloseCode.SESSION_LIMIT: "the session reached its time limit",
    CloseCode.MOVED: "the VM moved to another host",
}


class ConsoleDenied(Exception):
    """The console must not open (or go on); the message is for the server log only."""


def client_config(*, vm: Vm, view_only: bool, ticket_url: str) -> dict:
    """What the console page's JS needs: where to get a ticket, where to connect, how to
    offer it, and what each close code means."""
    return {
        "ticketUrl": ticket_url,
        "wsPath": f"/ws/vms/{vm.pk}/console/",
        "subprotocolPrefix": SUBPROTOCOL_PREFIX,
        "viewOnly": view_only,
        "closeReasons": {int(code): text for code, text in CLOSE_REASONS.items()},
    }


# --- tickets on the wire ---------------------------------------------------------------------


def token_from_protocols(offered: list[str]) -> tuple[str, str]:
    """(subprotocol, token) of the one ticket subprotocol offered; ConsoleDenied when
    there is none or more than one. (A token that cannot be a ticket is never looked up:
    ``tickets.ticket_consume`` answers None for it.)"""
    tickets = [p.strip() for p in offered if p.strip().startswith(SUBPROTOCOL_PREFIX)]
    if len(tickets) != 1:
        raise ConsoleDenied("no ticket subprotocol" if not tickets else "several tickets offered")
    return tickets[0], tickets[0].removeprefix(SUBPROTOCOL_PREFIX)


def ticket_binding_check(
    ticket: Ticket | None, *, user_id: int | None, session_key: str | None, vm_id: int | None
) -> Ticket:
    """The ticket exists and belongs to this user, browser session and VM.

    ``user_id``/``session_key`` None: no session to bind to (the websockify transport
    with ``--allow-without-session``); ``vm_id`` None: the path names no VM.
    """
    if ticket is None:
        raise ConsoleDenied("unknown, used or expired ticket")
    if user_id is not None and ticket.user_id != user_id:
        raise ConsoleDenied(f"ticket belongs to user {ticket.user_id}")
    if session_key is not None and not secrets.compare_digest(
        ticket.session_hash, session_hash(session_key)
    ):
        raise ConsoleDenied("ticket is from another browser session")
    if vm_id is not None and ticket.vm_id != vm_id:
        raise ConsoleDenied(f"ticket is for vm {ticket.vm_id}")
    return ticket


# --- who, now, and where --------------------------------------------------------------------


@dataclass(frozen=True)
class VncEndpoint:
    """A VNC server the proxy can reach: a loopback TCP port or a unix socket."""

    host: str = ""
    port: int | None = None
    socket: str = ""
    ssh: SshRoute | None = None  # the socket is on another host, through this channel


@dataclass(frozen=True)
class ConsoleTarget:
    vm_id: int
    host_name: str
    endpoint: VncEndpoint
    desktop_name: str  # what the VM's VNC server must announce (rfb.ServerStreamWatcher)
    is_course_staff: bool


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local(host: Host) -> bool:
    """Whether the proxy reaches the host's loopback as its own.

    A libvirt URI naming a remote server (``qemu+ssh://hv2/system``) means the recorded
    loopback endpoint is the *hypervisor's* loopback: connecting to it here would reach
    whatever listens on this machine's port, possibly another VM. Such hosts need a
    tunnel mapping first (docs/console.md, "Remote hypervisors").
    """
    server = urlsplit(host.uri).hostname
    return server is None or _is_loopback(server)


def vnc_endpoint_of(*, vm: Vm, beside_host: bool = False) -> VncEndpoint:
    """The VM's VNC endpoint as its worker last recorded it; ConsoleDenied if unusable.

    Only a unix socket or a loopback port of a host whose loopback is ours: a remote
    hypervisor's console is reached through a tunnel, never across the network.
    ``beside_host``: the caller runs on the VM's hypervisor (``manage.py console_proxy
    --host``), whose loopback is its own whatever the host's URI says.
    """
    if vm.host is not None and vm.host.console_ssh and not beside_host:
        # Another host's socket, through an SSH channel to it (consoles/tunnel.py).
        if not vm.vnc_socket.startswith("/"):
            raise ConsoleDenied("VM on a remote host has no VNC socket recorded")
        if not vm.host.console_ssh_host_key:
            raise ConsoleDenied("VM's host has no pinned SSH host key for its consoles")
        try:
            route = SshRoute.parse(vm.host.console_ssh, vm.host.console_ssh_host_key)
        except ValueError as error:
            raise ConsoleDenied(str(error)) from None
        return VncEndpoint(socket=vm.vnc_socket, ssh=route)
    if vm.host is None or not (beside_host or _is_local(vm.host)):
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


def target_for(
    *, user_id: int, vm_id: int, view_only: bool, served_host: str = ""
) -> ConsoleTarget:
    """Check, now, that this user may open this VM's console in this mode.

    The access policy decides (``access.may_console``): a driving console needs
    ``operate`` (a student member of the approved group, or course staff), a view-only one
    ``observe`` (course staff). The VM must be running (as last observed) and not being
    deleted, with a usable VNC endpoint. ``served_host``: the caller is the console proxy
    beside that host (by name), which serves its VMs and no other host's.
    """
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise ConsoleDenied("user missing or inactive")
    vm = Vm.objects.select_related("group", "host").filter(pk=vm_id).first()
    if vm is None:
        raise ConsoleDenied("no such VM")
    if not access.may_console(user=user, vm=vm, view_only=view_only):
        raise ConsoleDenied("view-only not allowed" if view_only else "may not drive this VM")
    if vm.desired_state == DesiredState.DELETED:
        raise ConsoleDenied("VM is being deleted")
    if vm.observed_state != ObservedState.RUNNING:
        raise ConsoleDenied("VM is not running")
    if served_host and (vm.host is None or vm.host.name != served_host):
        raise ConsoleDenied(f"VM is not on host {served_host}")
    endpoint = vnc_endpoint_of(vm=vm, beside_host=bool(served_host))
    if not vm.vnc_name:
        raise ConsoleDenied("VM's VNC desktop name is not recorded")
    return ConsoleTarget(
        vm_id=vm.pk,
        host_name=vm.host.name if vm.host else "",
        endpoint=endpoint,
        desktop_name=vm.vnc_name,
        is_course_staff=access.is_course_staff(user=user, course=vm.group.course_id),
    )


def moved_to(*, vm_id: int, host_name: str) -> str:
    """The host a VM's console should follow when its VNC server went away under a session
    opened on ``host_name``: the VM's host when it is another one now (the move has been
    recorded), the destination of its running move when there is one (the source's QEMU
    ends at the switch, before the worker records it); "" when the VM did not move."""
    vm = Vm.objects.select_related("host").filter(pk=vm_id).first()
    if vm is None or vm.host is None:
        return ""
    if vm.host.name != host_name:
        return vm.host.name
    move = (
        vm.operations.filter(kind=OperationKind.MOVE, status=OperationStatus.RUNNING)
        .order_by("-pk")
        .first()
    )
    if move is None or not move.params.get("live"):
        return ""
    destination = Host.objects.filter(pk=move.params.get("host")).values_list("name", flat=True)
    return destination.first() or ""


# --- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per connection (read when it opens: tests override the settings)."""

    max_frame: int
    idle_timeout: float
    max_session: float

    @classmethod
    def now(cls) -> "Limits":
        return cls(
            max_frame=settings.CONSOLE_MAX_FRAME,
            idle_timeout=float(settings.CONSOLE_IDLE_TIMEOUT),
            max_session=float(settings.CONSOLE_MAX_SESSION),
        )

    def over(self, *, started: float, last_input: float, now: float) -> tuple[int, str] | None:
        """(close code, reason) when a session that started at ``started`` and last had
        input at ``last_input`` (monotonic seconds) must end ``now``; else None."""
        if now - started >= self.max_session:
            return CloseCode.SESSION_LIMIT, "session limit"
        if now - last_input >= self.idle_timeout:
            return CloseCode.IDLE, "idle timeout"
        return None

    def next_check(self, *, started: float, last_input: float) -> float:
        """The monotonic time at which ``over`` may first say yes."""
        return min(started + self.max_session, last_input + self.idle_timeout)


# --- the audit row --------------------------------------------------------------------------


def session_start(*, user_id: int, vm_id: int, view_only: bool) -> int:
    """The audit row of a console session as it opens; returns its id."""
    return ConsoleSession.objects.create(user_id=user_id, vm_id=vm_id, view_only=view_only).pk


def session_end(*, session_id: int, bytes_to_vm: int, bytes_from_vm: int, close_reason: str):
    ConsoleSession.objects.filter(pk=session_id).update(
        ended_at=timezone.now(),
        bytes_to_vm=bytes_to_vm,
        bytes_from_vm=bytes_from_vm,
        close_reason=close_reason[:100],
    )


atarget_for = database_sync_to_async(target_for)
amoved_to = database_sync_to_async(moved_to)
asession_start = database_sync_to_async(session_start)
asession_end = database_sync_to_async(session_end)
