"""What a group may use (its course template's quotas, or the overrides an instructor set)
and what its live VMs use of it."""

from labs.errors import OverQuota
from labs.models import Group, Vm, VmTemplate, Volume

QUOTAS = ("vms", "vcpus", "memory_mib", "disk_gib")
LABELS = {"vms": "VMs", "vcpus": "vCPUs", "memory_mib": "memory", "disk_gib": "disk"}


def template_of(group: Group) -> VmTemplate | None:
    return VmTemplate.objects.select_related("image").filter(course=group.course_id).first()


def group_quota(*, group: Group) -> dict[str, int]:
    template = template_of(group)
    if template is None:
        return dict.fromkeys(QUOTAS, 0)
    return {
        key: override
        if (override := getattr(group, f"quota_{key}")) is not None
        else getattr(template, f"quota_{key}")
        for key in QUOTAS
    }


def snapshot_memory_gib(vm: Vm) -> int:
    """What a snapshot with memory costs on the host's disk: the VM's memory, in whole GiB
    (the RAM is saved inside the VM's overlay)."""
    return -(-vm.memory_mib // 1024)


def group_usage(*, group: Group, vms: list[Vm] | None = None) -> dict[str, int]:
    """What the group's live VMs use of its quota: their disks, plus the memory saved in
    their snapshots, plus its block volumes (one query). ``vms``: those VMs with their
    snapshots prefetched, when the caller has them loaded already (the group page), so
    that no query is made for them."""
    if vms is None:
        vms = list(
            Vm.objects.live()
            .filter(group=group)
            .only("vcpus", "memory_mib", "disk_gib")
            .prefetch_related("snapshots")
        )
    saved = sum(
        snapshot_memory_gib(vm) for vm in vms for snap in vm.snapshots.all() if snap.with_memory
    )
    return {
        "vms": len(vms),
        "vcpus": sum(vm.vcpus for vm in vms),
        "memory_mib": sum(vm.memory_mib for vm in vms),
        "disk_gib": sum(vm.disk_gib for vm in vms)
        + saved
        + volumes_gib(group=group)
        + shares_gib(group=group),
    }


def volumes_gib(*, group: Group) -> int:
    """What the group's block volumes take of its disk quota: every one, attached or not
    (labs/compute/volumes.py)."""
    return sum(Volume.objects.filter(group=group).values_list("size_gib", flat=True))


def shares_gib(*, group: Group) -> int:
    """What the group share takes of the disk quota: its files' blocks, measured now
    (labs/compute/shares.py); nothing for a course without shares."""
    from labs.compute.shares import group_share_gib

    if not group.course.shares:  # the course is loaded with the group nearly always
        return 0
    return group_share_gib(group=group)


def quota_check(*, group: Group, need: dict[str, int]) -> None:
    """OverQuota naming what would run over, when ``need`` does not fit what is left.
    A course without a VM template sets no quota (its VMs were made by hand)."""
    if template_of(group) is None:
        return
    quota, used = group_quota(group=group), group_usage(group=group)
    over = [k for k in need if used[k] + need[k] > quota[k]]
    if over:
        raise OverQuota(
            "Over your group's quota for "
            + ", ".join(LABELS[k] for k in over)
            + ". Ask your instructor to raise it."
        )
