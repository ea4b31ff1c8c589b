"""Where a VM runs: one capacity formula, and the choice of a host with room.

``capacity`` is the one formula (what a host offers with its overcommit ratios); the
overview and the admin show what ``host_usages`` computes with it, and placement decides
with it, so the three never disagree.

Placement chooses only among hosts that are up (``Host.state``: not disabled, draining or
unreachable) and hold the VM's image (labs/compute/image_copies.py); a group's VMs stay on
the host where its others run while it has room; the course's policy (pack or spread)
chooses otherwise. docs/decisions.md says why.
"""

from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, Q, Sum, Value
from django.db.models.functions import Coalesce

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    DesiredState,
    HostState,
    OperationKind,
    PlacementPolicy,
)
from labs.compute.image_copies import holds_image, hosts_holding
from labs.models import Course, Host, Image, Operation, Publication, Vm

RESOURCES = ("vcpus", "memory_mib", "disk_gib")


def capacity(host: Host) -> dict[str, int]:
    """What the host offers new VMs, overcommit included (vCPUs, MiB, GiB)."""
    return {
        "vcpus": int(host.vcpus * host.cpu_overcommit),
        "memory_mib": int(host.memory_mib * host.memory_overcommit),
        "disk_gib": int(host.disk_gib * host.disk_overcommit),
    }


@dataclass(frozen=True)
class HostUsage:
    """What a host's live VMs take, against its capacity (``capacity``)."""

    host: Host
    vcpus: tuple[int, int]  # (used, capacity)
    memory_mib: tuple[int, int]
    disk_gib: tuple[int, int]
    course_vms: int = 0  # live VMs of the course asked about

    @property
    def free(self) -> dict[str, int]:
        return {r: getattr(self, r)[1] - getattr(self, r)[0] for r in RESOURCES}

    @property
    def is_full(self) -> bool:
        return any(free <= 0 for free in self.free.values())

    def fits(self, vm: Vm) -> bool:
        return all(getattr(vm, r) <= free for r, free in self.free.items())


_LIVE = Q(vms__desired_state__in=[s for s in DesiredState.values if s != DesiredState.DELETED])


def host_usages(*, hosts=None, course: Course | None = None) -> list[HostUsage]:
    """Every host's usage in one grouped query (of ``hosts``, default every host).

    With a course: the enabled hosts and the hosts holding any live VM of the course,
    with the count of that course's VMs on each.
    """
    hosts = hosts_with_usage(Host.objects.all() if hosts is None else hosts, course=course)
    if course is not None:
        holding = Vm.objects.live().filter(group__course=course, host__isnull=False)
        hosts = hosts.filter(Q(enabled=True) | Q(pk__in=holding.values("host_id")))
    return [usage_of(host) for host in hosts.order_by("name")]


def hosts_with_usage(hosts, *, course: Course | None = None):
    """The hosts with what their live VMs use, their live VMs' count and (with a course)
    the count of that course's, annotated in the same grouped query, for ``usage_of``."""
    return hosts.annotate(
        used_vcpus=Coalesce(Sum("vms__vcpus", filter=_LIVE), 0),
        used_memory_mib=Coalesce(Sum("vms__memory_mib", filter=_LIVE), 0),
        used_disk_gib=Coalesce(Sum("vms__disk_gib", filter=_LIVE), 0),
        live_vms=Count("vms", filter=_LIVE),
        course_vms=Count("vms", filter=_LIVE & Q(vms__group__course=course))
        if course is not None
        else Value(0),
    )


def usage_of(host: Host) -> HostUsage:
    """The usage of a host from ``hosts_with_usage``."""
    offered = capacity(host)
    return HostUsage(
        host=host,
        vcpus=(host.used_vcpus, offered["vcpus"]),
        memory_mib=(host.used_memory_mib, offered["memory_mib"]),
        disk_gib=(host.used_disk_gib, offered["disk_gib"]),
        course_vms=host.course_vms,
    )


def host_usage(*, host: Host) -> HostUsage:
    return host_usages(hosts=Host.objects.filter(pk=host.pk))[0]


#: The hosts placement may choose: enabled, not draining, answering (``Host.state`` "up").
UP = Q(enabled=True, draining=False, unreachable_since__isnull=True)


def _ports_taken(hosts: list[Host]) -> dict[int, set[int]]:
    """The SSH ports in use on each of the hosts, or taken there by a move on its way
    (labs.compute.moves records the port in the operation's parameters), in two queries."""
    taken: dict[int, set[int]] = {h.pk: set() for h in hosts}
    # order_by(): no Meta ordering, which would join groups and courses to sort the lot.
    rows = Vm.objects.filter(host__in=hosts, ssh_port__isnull=False).order_by()
    for host_id, port in rows.values_list("host_id", "ssh_port"):
        taken[host_id].add(port)
    moving = Operation.objects.filter(
        kind=OperationKind.MOVE, status__in=ACTIVE_OPERATION_STATUSES
    ).values_list("params", flat=True)
    for params in moving:
        if params.get("host") in taken:
            taken[params["host"]].add(params.get("ssh_port"))
    return taken


def _free_ssh_port(host: Host, taken: set[int]) -> int | None:
    for port in range(host.ssh_port_min, host.ssh_port_max + 1):
        if port not in taken:
            return port
    return None


def published_ports_free(host: Host, *, count: int = 1) -> list[int]:
    """Up to ``count`` ports of ``host``'s published range that no publication there holds
    and no move to it has taken (labs.compute.moves records them in its parameters), the
    lowest first. The database's ``publication_port_unique_per_host`` decides a race."""
    taken = set(Publication.objects.filter(host=host).values_list("host_port", flat=True))
    moving = Operation.objects.filter(
        kind=OperationKind.MOVE, status__in=ACTIVE_OPERATION_STATUSES
    ).values_list("params", flat=True)
    for params in moving:
        if params.get("host") == host.pk:
            taken.update((params.get("ports") or {}).values())
    free = []
    for port in range(host.published_port_min, host.published_port_max + 1):
        if port not in taken:
            free.append(port)
            if len(free) == count:
                break
    return free


def _listed(items: list[str], *, most: int = 4) -> str:
    """``a, b, c``; past ``most`` items, ``and 3 more``."""
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _say(message: str) -> str:
    """The message as the VM's status_message holds it (cut to the column's length)."""
    limit = Vm._meta.get_field("status_message").max_length
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _waiting_reason(*, up: list[Host]) -> str:
    """Why nothing fits: no host is up (and which are not, and why), or none has room."""
    down = _listed([f"{h.name} {h.state_label}" for h in Host.objects.exclude(UP)])
    if not up:
        return f"no host is up ({down})" if down else "no host is registered yet"
    return "no host has room for it right now" + (f" ({down})" if down else "")


def _split_note(*, chosen: Host, home: list[Host]) -> str:
    """Why a group's VM went elsewhere than where the group's other VMs run."""

    def why(host: Host) -> str:
        return "full" if host.state == HostState.UP else host.state_label

    if len(home) == 1:
        return (
            f"Placed on {chosen.name}: {home[0].name}, where the group's other VMs run, "
            f"is {why(home[0])}."
        )
    listed = _listed([f"{h.name} ({why(h)})" for h in home])
    return f"Placed on {chosen.name}: the group's other VMs run on {listed}."


def vm_place(*, vm: Vm) -> bool:
    """Put an unplaced VM on a host that is up and has room for it (and a free SSH port).

    Where the group's other live VMs run comes first (the one holding most of them, if it
    fits); otherwise the course's policy chooses among the hosts that fit: ``spread``
    takes the one with the most free memory, ``pack`` the one with the least that still
    fits. Ties go to the first by name. A group's VMs placed apart say so on the VM.

    Returns False (and says why on the VM) when no host is up or none has room; the VM
    then waits and the reconcile loop tries again. Seven queries, however many hosts.
    """
    with transaction.atomic():
        # Lock the hosts that are up: two placements at once see each other's VMs.
        up = list(
            Host.objects.select_for_update()
            .filter(UP)
            .annotate(**holds_image(vm.image_id))
            .order_by("name")
        )
        if up and not any(h.image_everywhere or h.image_copied for h in up):
            image = Image.objects.get(pk=vm.image_id)
            vm.status_message = _say(f"Waiting: no host that is up holds its image {image} yet.")
            Vm.objects.filter(pk=vm.pk).update(status_message=vm.status_message)
            return False
        up = [h for h in up if h.image_everywhere or h.image_copied]
        usages = host_usages(hosts=Host.objects.filter(pk__in=[h.pk for h in up]))
        taken = _ports_taken(up)
        fitting: list[tuple[HostUsage, int]] = []
        for usage in usages:
            port = _free_ssh_port(usage.host, taken[usage.host.pk])
            if usage.fits(vm) and port is not None:
                fitting.append((usage, port))
        if not fitting:
            vm.status_message = _say(f"Waiting: {_waiting_reason(up=up)}.")
            Vm.objects.filter(pk=vm.pk).update(status_message=vm.status_message)
            return False
        policy = Course.objects.filter(groups=vm.group_id).values_list("placement", flat=True)
        pack = policy.first() == PlacementPolicy.PACK
        # Where the group's other live VMs run, most of them first (any host state).
        home = list(
            Host.objects.annotate(
                group_vms=Count("vms", filter=_LIVE & Q(vms__group_id=vm.group_id))
            )
            .filter(group_vms__gt=0)
            .order_by("-group_vms", "name")
        )
        group_vms = {h.pk: h.group_vms for h in home}
        at_home = [c for c in fitting if c[0].host.pk in group_vms]
        if at_home:
            most = max(group_vms[usage.host.pk] for usage, _ in at_home)
            at_home = [c for c in at_home if group_vms[c[0].host.pk] == most]
        choices = at_home or fitting
        # min/max keep the first they saw: on a tie, the first by name.
        pick = min if pack else max
        usage, port = pick(choices, key=lambda c: c[0].free["memory_mib"])
        note = "" if at_home or not home else _split_note(chosen=usage.host, home=home)
        vm.host, vm.ssh_port, vm.status_message = usage.host, port, _say(note)
        vm.save(update_fields=["host", "ssh_port", "status_message", "updated_at"])
        return True


def move_destination(*, vm: Vm, away_from: Host) -> Host | None:
    """Where ``vm`` can go when it leaves ``away_from`` (a drain): a host that is up, has
    room, a free SSH port and the VM's image, by the course's policy (spread: most free
    memory; pack: the least that still fits). None when no host can take it."""
    hosts = list(
        Host.objects.filter(UP, hosts_holding(vm.image)).exclude(pk=away_from.pk).order_by("name")
    )
    taken = _ports_taken(hosts)
    fitting = [
        usage
        for usage in host_usages(hosts=Host.objects.filter(pk__in=[h.pk for h in hosts]))
        if usage.fits(vm) and _free_ssh_port(usage.host, taken[usage.host.pk]) is not None
    ]
    if not fitting:
        return None
    policy = Course.objects.filter(groups=vm.group_id).values_list("placement", flat=True)
    pick = min if policy.first() == PlacementPolicy.PACK else max
    return pick(fitting, key=lambda usage: usage.free["memory_mib"]).host
