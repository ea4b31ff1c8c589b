"""Where a VM runs: one capacity formula, and the choice of a host with room.

``capacity`` is the one formula (what a host offers with its overcommit ratios); the
overview and the admin show what ``host_usages`` computes with it, and placement decides
with it, so the three never disagree.
"""

from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, Q, Sum, Value
from django.db.models.functions import Coalesce

from labs.choices import DesiredState
from labs.models import Course, Host, Vm

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
    hosts = (Host.objects.all() if hosts is None else hosts).annotate(
        used_vcpus=Coalesce(Sum("vms__vcpus", filter=_LIVE), 0),
        used_memory_mib=Coalesce(Sum("vms__memory_mib", filter=_LIVE), 0),
        used_disk_gib=Coalesce(Sum("vms__disk_gib", filter=_LIVE), 0),
        course_vms=Count("vms", filter=_LIVE & Q(vms__group__course=course))
        if course is not None
        else Value(0),
    )
    if course is not None:
        holding = Vm.objects.live().filter(group__course=course, host__isnull=False)
        hosts = hosts.filter(Q(enabled=True) | Q(pk__in=holding.values("host_id")))
    return [_usage(host) for host in hosts.order_by("name")]


def _usage(host: Host) -> HostUsage:
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


def _free_ssh_port(host: Host) -> int | None:
    taken = set(
        Vm.objects.filter(host=host, ssh_port__isnull=False).values_list("ssh_port", flat=True)
    )
    for port in range(host.ssh_port_min, host.ssh_port_max + 1):
        if port not in taken:
            return port
    return None


def vm_place(*, vm: Vm) -> bool:
    """Put an unplaced VM on the enabled host with the most free memory that fits it.

    Returns False (and says why on the VM) when no host has room; the VM then waits and
    the reconcile loop tries again.
    """
    with transaction.atomic():
        # Lock the enabled hosts: two placements at once see each other's VMs.
        hosts = list(Host.objects.select_for_update().filter(enabled=True).order_by("name"))
        usages = host_usages(hosts=Host.objects.filter(pk__in=[h.pk for h in hosts]))
        candidates = []
        for usage in usages:
            if usage.fits(vm) and (port := _free_ssh_port(usage.host)) is not None:
                candidates.append((usage.free["memory_mib"], usage.host, port))
        if not candidates:
            why = "no enabled host" if not hosts else "no host has room for it right now"
            Vm.objects.filter(pk=vm.pk).update(status_message=f"Waiting: {why}.")
            vm.status_message = f"Waiting: {why}."
            return False
        # Most free memory; on a tie the first by name (max keeps the first it saw).
        _, host, port = max(candidates, key=lambda c: c[0])
        vm.host, vm.ssh_port, vm.status_message = host, port, ""
        vm.save(update_fields=["host", "ssh_port", "status_message", "updated_at"])
        return True
