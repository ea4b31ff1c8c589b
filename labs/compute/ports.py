"""Published ports: a member makes a guest TCP port (a web server on 80) reachable on its
host's address at a port Stratus allocates there.

A publication is a row (labs/models/ports.py) holding one port of the host's published
range, which the database keeps to one publication per host; it counts against the
group's quota (``Course.published_ports_per_group``) and is refused for the course's
forbidden guest ports (``Course.forbidden_guest_ports``; SSH's 22 always). Publishing and
unpublishing change the hypervisor's state of a running VM, so each is an Operation of the
catalogue (labs/compute/kinds.py: ``port_publish``, ``port_unpublish``) on its VM, run by
its host's worker: the row is the audit trail and the page updates live. The domain's
definition carries the forward (every start has it: nothing is redefined on start), and a
running QEMU gets it at once through its monitor (labs/drivers/libvirt/ports.py).

While the VM is not running nothing listens (its QEMU is gone); the page shows the
publication closed until the VM runs again. A move gives it a port of the destination's
range (labs/compute/moves.py); the VM's deletion or archiving frees it. TCP only.
"""

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from labs import access
from labs.access import Action
from labs.choices import ACTIVE_OPERATION_STATUSES, NetworkMode, OperationKind, PortState
from labs.compute import dispatch, kinds, placement, requests, term
from labs.errors import Busy, Invalid, OverQuota, Refused
from labs.models import Group, Host, Operation, Publication, Vm

# --- reads ---------------------------------------------------------------------------------


def publication_for_user(*, user: AbstractBaseUser, publication_id: int) -> Publication:
    """A publication the user may view (its group's member, course staff); else 404."""
    from django.http import Http404

    publication = (
        access.restrict(Publication.objects.all(), user=user, action=Action.VIEW)
        .select_related("vm__group__course", "vm__host", "host")
        .filter(pk=publication_id)
        .first()
    )
    if publication is None:
        raise Http404("No such published port.")
    return publication


def publications_of_group(*, group: Group) -> list[Publication]:
    """The group's publications with their VM and host, by VM and guest port (one query)."""
    return list(
        Publication.objects.filter(vm__group=group)
        .select_related("vm", "host")
        .order_by("vm__name", "guest_port")
    )


def quota_left(*, group: Group) -> int:
    course = group.course
    used = Publication.objects.filter(vm__group=group).count()
    return max(course.published_ports_per_group - used, 0)


# --- the checks ------------------------------------------------------------------------------


def _checked(*, kind: str, vm: Vm, by: AbstractBaseUser | None) -> None:
    """Who may ask, the deadline, the group's rate, and the VM's state: the same rules as
    every other operation on the VM (labs/compute/requests.py)."""
    entry = kinds.CATALOGUE[kind]
    requests.requester_check(kind=entry, vm=vm, by=by)
    if (locked := term.request_refusal(kind=kind, vm=vm, by=by)) is not None:
        raise locked
    requests.rate_check(vm=vm, by=by)
    if (refused := kinds.refusal(entry, vm, active=None)) is not None:
        raise refused


def port_clean(value) -> int:
    """A guest port from a form: a whole number 1-65535."""
    text = str(value if value is not None else "").strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid("A guest port is a whole number from 1 to 65535 (80 for a web server).")
    return int(text)


def _busy(publication: Publication) -> None:
    active = Operation.objects.filter(
        status__in=ACTIVE_OPERATION_STATUSES, params__publication=publication.pk
    ).first()
    if active is not None:
        raise Busy(
            f"Port {publication.guest_port} of {publication.vm.name} is busy "
            f"({active.get_kind_display().lower()}); try again when it has finished."
        )


def _send(*, vm: Vm, kind: str, publication: Publication, by) -> Operation:
    params = {
        "publication": publication.pk,
        "name": str(publication.guest_port),  # the history shows Publish port “80”
        "guest_port": publication.guest_port,
        "host_port": publication.host_port,
    }
    return dispatch.operation_create(vm=vm, kind=kind, by=by, params=params)


# --- the requests ----------------------------------------------------------------------------


def port_publish_request(*, vm: Vm, guest_port, by: AbstractBaseUser | None) -> Operation:
    """Publish ``guest_port`` of ``vm`` on a free port of its host's published range:
    within the group's quota, never a port the course forbids."""
    port = port_clean(guest_port)
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    _checked(kind=OperationKind.PORT_PUBLISH, vm=vm, by=by)
    if vm.host.network_mode != NetworkMode.USER:
        raise Refused(
            f"{vm.name} is on a bridged network: its ports are reached on its own address, "
            "nothing needs publishing."
        )
    course = vm.group.course
    if port in course.forbidden_ports:
        why = " (SSH: use the SSH line above)" if port == 22 else ""
        raise Refused(f"Guest port {port} may not be published in this course{why}.")
    try:
        with transaction.atomic():
            group = Group.objects.select_for_update().get(pk=vm.group_id)
            if Publication.objects.filter(vm=vm, guest_port=port).exists():
                raise Refused(f"Port {port} of {vm.name} is published already.")
            used = Publication.objects.filter(vm__group=group).count()
            if used >= course.published_ports_per_group:
                raise OverQuota(
                    f"Your group publishes {used} port{'s' if used != 1 else ''}, the most "
                    "this course allows: unpublish one first."
                )
            host = Host.objects.select_for_update().get(pk=vm.host_id)
            free = placement.published_ports_free(host)
            if not free:
                raise Refused(
                    f"Host {host.name} has no free port to publish on: ask your instructor."
                )
            publication = Publication.objects.create(
                vm=vm, host=host, host_port=free[0], guest_port=port, created_by=by
            )
            return _send(vm=vm, kind=OperationKind.PORT_PUBLISH, publication=publication, by=by)
    except IntegrityError:  # another request took that host port a moment before
        raise Busy("Another port was being published at the same time: try again.") from None


def port_unpublish_request(*, publication: Publication, by: AbstractBaseUser | None) -> Operation:
    """Close a published port: the forward goes (at once on a running VM), and its host
    port is free again."""
    publication = Publication.objects.select_related("vm__host", "vm__group__course").get(
        pk=publication.pk
    )
    vm = publication.vm
    _checked(kind=OperationKind.PORT_UNPUBLISH, vm=vm, by=by)
    _busy(publication)
    with transaction.atomic():
        Publication.objects.filter(pk=publication.pk).update(state=PortState.CLOSING)
        return _send(vm=vm, kind=OperationKind.PORT_UNPUBLISH, publication=publication, by=by)
