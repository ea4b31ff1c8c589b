"""What a group may use (its course template's quotas, or the overrides an instructor set)
and what its live VMs use of it."""

from labs.errors import OverQuota
from labs.models import Group, Vm, VmTemplate

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


def group_usage(*, group: Group, vms: list[Vm] | None = None) -> dict[str, int]:
    """What the group's live VMs use of its quota; ``vms``: those VMs when the caller has
    them loaded already (the group page), so that no query is made."""
    if vms is None:
        vms = list(Vm.objects.live().filter(group=group).only("vcpus", "memory_mib", "disk_gib"))
    return {
        "vms": len(vms),
        "vcpus": sum(vm.vcpus for vm in vms),
        "memory_mib": sum(vm.memory_mib for vm in vms),
        "disk_gib": sum(vm.disk_gib for vm in vms),
    }


def quota_check(*, group: Group, need: dict[str, int]) -> None:
    """OverQuota naming what would run over, when ``need`` does not fit what is left."""
    quota, used = group_quota(group=group), group_usage(group=group)
    over = [k for k in need if used[k] + need[k] > quota[k]]
    if over:
        raise OverQuota(
            "Over your group's quota for "
            + ", ".join(LABELS[k] for k in over)
            + ". Ask your instructor to raise it."
        )
