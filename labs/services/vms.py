"""VMs and their operations: every change to a VM is an Operation row run by a worker.

Requests (views, admin, commands) call ``vm_*`` functions here, which validate, write an
Operation and enqueue it after commit. Workers call ``operation_run``, which claims the
row, drives the hypervisor adapter and records how it ended.
"""

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    DesiredState,
    GroupStatus,
    ObservedState,
    OperationKind,
    OperationStatus,
)
from labs.models import Group, Host, Operation, Snapshot, Vm, VmTemplate
from labs.selectors import user_is_course_staff
from labs.services import cloudinit, consoles, events, hypervisor
from labs.services.hypervisor import HypervisorError, HypervisorUnavailable, VmSpec

log = logging.getLogger(__name__)

SNAPSHOT_NAME_MAX = 60
# Operations a student may ask for, by the VM state they need.
NEEDS_RUNNING = {OperationKind.STOP, OperationKind.REBOOT, OperationKind.FORCE_OFF}
NEEDS_STOPPED = {OperationKind.START}


# --- placement ---------------------------------------------------------------------------


def _host_usage(host: Host) -> dict[str, int]:
    used = (
        Vm.objects.filter(host=host)
        .exclude(desired_state=DesiredState.DELETED)
        .aggregate(vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"), disk_gib=Sum("disk_gib"))
    )
    return {k: v or 0 for k, v in used.items()}


def host_capacity(*, host: Host) -> dict[str, tuple[int, int]]:
    """(used, available-with-overcommit) for vCPUs, memory and disk of one host."""
    used = _host_usage(host)
    return {
        "vcpus": (used["vcpus"], int(host.vcpus * host.cpu_overcommit)),
        "memory_mib": (used["memory_mib"], int(host.memory_mib * host.memory_overcommit)),
        "disk_gib": (used["disk_gib"], int(host.disk_gib * host.disk_overcommit)),
    }


def _fits(host: Host, vm: Vm) -> bool:
    cap = host_capacity(host=host)
    need = {"vcpus": vm.vcpus, "memory_mib": vm.memory_mib, "disk_gib": vm.disk_gib}
    return all(cap[k][0] + need[k] <= cap[k][1] for k in need)


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
        hosts = list(Host.objects.select_for_update().filter(enabled=True).order_by("name"))
        candidates = []
        for host in hosts:
            if _fits(host, vm) and (port := _free_ssh_port(host)) is not None:
                used, available = host_capacity(host=host)["memory_mib"]
                candidates.append((available - used, host, port))
        if not candidates:
            why = "no enabled host" if not hosts else "no host has room for it right now"
            Vm.objects.filter(pk=vm.pk).update(status_message=f"Waiting: {why}.")
            vm.status_message = f"Waiting: {why}."
            return False
        _, host, port = max(candidates, key=lambda c: c[0])
        vm.host, vm.ssh_port, vm.status_message = host, port, ""
        vm.save(update_fields=["host", "ssh_port", "status_message", "updated_at"])
        return True


# --- creating VMs --------------------------------------------------------------------------


def _template(group: Group) -> VmTemplate | None:
    return VmTemplate.objects.select_related("image").filter(course=group.course_id).first()


def group_quota(*, group: Group) -> dict[str, int]:
    template = _template(group)
    if template is None:
        return {"vms": 0, "vcpus": 0, "memory_mib": 0, "disk_gib": 0}
    return {
        "vms": group.quota_vms if group.quota_vms is not None else template.quota_vms,
        "vcpus": group.quota_vcpus if group.quota_vcpus is not None else template.quota_vcpus,
        "memory_mib": group.quota_memory_mib
        if group.quota_memory_mib is not None
        else template.quota_memory_mib,
        "disk_gib": group.quota_disk_gib
        if group.quota_disk_gib is not None
        else template.quota_disk_gib,
    }


def group_usage(*, group: Group, vms: list[Vm] | None = None) -> dict[str, int]:
    """What the group's live VMs use of its quota; ``vms``: those VMs when the caller has
    them loaded already (the group page), so that no query is made."""
    if vms is None:
        vms = list(
            Vm.objects.filter(group=group)
            .exclude(desired_state=DesiredState.DELETED)
            .only("vcpus", "memory_mib", "disk_gib")
        )
    return {
        "vms": len(vms),
        "vcpus": sum(vm.vcpus for vm in vms),
        "memory_mib": sum(vm.memory_mib for vm in vms),
        "disk_gib": sum(vm.disk_gib for vm in vms),
    }


def _next_vm_name(group: Group) -> str:
    names = set(Vm.objects.filter(group=group).values_list("name", flat=True))
    n = 1
    while f"vm{n}" in names:
        n += 1
    return f"vm{n}"


def _vm_new(*, group: Group, template: VmTemplate, by: AbstractBaseUser | None) -> Vm:
    vm = Vm.objects.create(
        group=group,
        name=_next_vm_name(group),
        image=template.image,
        vcpus=template.vcpus,
        memory_mib=template.memory_mib,
        disk_gib=template.disk_gib,
        instance_id=uuid.uuid4().hex,
    )
    vm_place(vm=vm)
    _operation_new(vm=vm, kind=OperationKind.PROVISION, by=by)
    events.event_vm(vm=vm)
    return vm


def group_vms_create(*, group: Group, by: AbstractBaseUser | None) -> list[Vm]:
    """At approval: create the course template's VMs the group does not have yet."""
    template = _template(group)
    if template is None:
        return []
    have = Vm.objects.filter(group=group).exclude(desired_state=DesiredState.DELETED).count()
    return [_vm_new(group=group, template=template, by=by) for _ in range(template.count - have)]


def vm_create(*, group: Group, by: AbstractBaseUser) -> Vm:
    """A member adds one more VM, within the group's quota."""
    with transaction.atomic():
        group = Group.objects.select_for_update().get(pk=group.pk)
        if group.status != GroupStatus.APPROVED:
            raise ValidationError("Only approved groups have VMs.")
        template = _template(group)
        if template is None:
            raise ValidationError("This course has no VM template yet; ask your instructor.")
        quota, used = group_quota(group=group), group_usage(group=group)
        need = {
            "vms": 1,
            "vcpus": template.vcpus,
            "memory_mib": template.memory_mib,
            "disk_gib": template.disk_gib,
        }
        over = [k for k in need if used[k] + need[k] > quota[k]]
        if over:
            labels = {"vms": "VMs", "vcpus": "vCPUs", "memory_mib": "memory", "disk_gib": "disk"}
            raise ValidationError(
                "Over your group's quota for "
                + ", ".join(labels[k] for k in over)
                + ". Ask your instructor to raise it."
            )
        return _vm_new(group=group, template=template, by=by)


# --- requesting operations -----------------------------------------------------------------


def _enqueue(op: Operation) -> None:
    from labs.tasks import operation_run_task  # tasks import services, not the other way

    def send():
        result = operation_run_task.delay(op.pk)
        Operation.objects.filter(pk=op.pk).update(celery_task_id=result.id or "")

    transaction.on_commit(send)


def _operation_new(
    *, vm: Vm, kind: str, by: AbstractBaseUser | None, params: dict | None = None
) -> Operation:
    try:
        with transaction.atomic():
            op = Operation.objects.create(vm=vm, kind=kind, requested_by=by, params=params or {})
    except IntegrityError:
        active = vm.operations.filter(status__in=ACTIVE_OPERATION_STATUSES).first()
        what = active.get_kind_display().lower() if active else "another operation"
        raise ValidationError(
            f"{vm.name} is busy ({what} in progress); try again when it has finished.",
            code="busy",
        ) from None
    events.event_operation(operation=op)
    if vm.host_id is not None:
        _enqueue(op)
    return op


def vm_operation_request(
    *, vm: Vm, kind: str, by: AbstractBaseUser | None, params: dict | None = None
) -> Operation:
    """Ask for one operation on a VM; refused clearly if it makes no sense right now."""
    if kind not in OperationKind.values or kind == OperationKind.PROVISION:
        raise ValidationError("Unknown operation.")
    vm = Vm.objects.select_related("host", "group__course").get(pk=vm.pk)
    if (
        vm.group.status != GroupStatus.APPROVED
        and by is not None
        and not user_is_course_staff(user=by, course=vm.group.course)
    ):
        raise ValidationError("The group is not approved; ask your instructor.")
    if vm.desired_state == DesiredState.DELETED:
        raise ValidationError(f"{vm.name} is deleted.")
    if vm.host_id is None or vm.observed_state == ObservedState.NEW:
        raise ValidationError(f"{vm.name} is not created yet.")
    if kind in NEEDS_RUNNING and vm.observed_state != ObservedState.RUNNING:
        raise ValidationError(f"{vm.name} is not running.")
    if kind in NEEDS_STOPPED and vm.observed_state == ObservedState.RUNNING:
        raise ValidationError(f"{vm.name} is already running.")
    params = dict(params or {})
    if kind == OperationKind.SNAPSHOT:
        params = _snapshot_params(vm, params)
    if kind in (OperationKind.REVERT, OperationKind.SNAPSHOT_DELETE):
        name = str(params.get("name", ""))
        if not vm.snapshots.filter(name=name).exists():
            raise ValidationError(f"{vm.name} has no snapshot named “{name}”.")
        params = {"name": name}
    return _operation_new(vm=vm, kind=kind, by=by, params=params)


def _snapshot_params(vm: Vm, params: dict) -> dict:
    name = str(params.get("name") or "").strip() or timezone.now().strftime("snap-%Y%m%d-%H%M%S")
    if len(name) > SNAPSHOT_NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
        raise ValidationError(
            "A snapshot name uses letters, digits, '-', '_' and '.', up to 60 characters."
        )
    if vm.snapshots.filter(name=name).exists():
        raise ValidationError(f"{vm.name} already has a snapshot named “{name}”.")
    # A running VM is snapshotted with its memory (it comes back running); a stopped VM
    # gets a disk-only snapshot.
    return {"name": name, "with_memory": vm.observed_state == ObservedState.RUNNING}


# --- running operations (workers) ------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    status: str  # "skipped" | "succeeded" | "failed" | "retry"
    error: str = ""


def operation_claim(*, operation_id: int, worker: str) -> Operation | None:
    """queued → running by a conditional UPDATE; None when another worker has it."""
    claimed = Operation.objects.filter(pk=operation_id, status=OperationStatus.QUEUED).update(
        status=OperationStatus.RUNNING,
        worker=worker,
        started_at=timezone.now(),
        attempts=F("attempts") + 1,
        error="",
    )
    if not claimed:
        return None
    op = Operation.objects.select_related("vm__host", "vm__image", "vm__group").get(
        pk=operation_id
    )
    events.event_operation(operation=op)
    return op


def _finish(op: Operation, status: str, error: str = "", progress: str | None = None) -> None:
    fields = {"status": status, "error": error, "finished_at": timezone.now()}
    if progress is not None:
        fields["progress"] = progress
    Operation.objects.filter(pk=op.pk).update(**fields)
    events.event_operation(operation=op)


def operation_run(*, operation_id: int, worker: str, may_retry: bool) -> RunOutcome:
    """Claim and run one Operation; record how it ended.

    A transient hypervisor error puts the operation back to ``queued`` (the task then
    retries it with backoff) while ``may_retry``; any other failure ends it ``failed``
    with a message a student can act on. Never leaves it ``running``.
    """
    op = operation_claim(operation_id=operation_id, worker=worker)
    if op is None:
        return RunOutcome("skipped")
    try:
        _EXECUTORS[op.kind](op)
    except HypervisorUnavailable as error:
        message = events.without_host_uri(f"{error} — the host did not answer", op.vm)
        if may_retry:
            Operation.objects.filter(pk=op.pk).update(
                status=OperationStatus.QUEUED, error=message, progress="waiting to retry"
            )
            events.event_operation(operation=op)
            return RunOutcome("retry", message)
        _finish(op, OperationStatus.FAILED, f"{message}; gave up after {op.attempts} tries.")
        _observe(op.vm, ObservedState.UNKNOWN)
        return RunOutcome("failed", message)
    except (HypervisorError, ValidationError) as error:
        # Members read the message on their page: the host's name, not its libvirt URI.
        message = events.without_host_uri(
            " ".join(getattr(error, "messages", [str(error)])), op.vm
        )
        _finish(op, OperationStatus.FAILED, message)
        return RunOutcome("failed", message)
    except Exception:
        log.exception("operation %s (%s) crashed", op.pk, op.kind)
        _finish(op, OperationStatus.FAILED, "Internal error; the operators have the details.")
        raise
    _finish(op, OperationStatus.SUCCEEDED, progress="done")
    return RunOutcome("succeeded")


def operations_recover(*, worker_prefix: str, alive_worker: str) -> list[int]:
    """Re-queue operations a killed worker left ``running`` (called when a worker starts).

    ``worker_prefix`` names this worker node and ``alive_worker`` its current start (node
    plus a per-start id, shared by the pool's children): an operation the node claimed
    under an earlier start cannot still be running. Returns the ids to enqueue again.
    """
    orphaned = list(
        Operation.objects.filter(status=OperationStatus.RUNNING, worker__startswith=worker_prefix)
        .exclude(worker=alive_worker)
        .values_list("pk", flat=True)
    )
    if orphaned:
        Operation.objects.filter(pk__in=orphaned, status=OperationStatus.RUNNING).update(
            status=OperationStatus.QUEUED, progress="re-queued after a worker crash"
        )
        for op in Operation.objects.filter(pk__in=orphaned):
            events.event_operation(operation=op)
    return orphaned


def operation_enqueue(*, operation_id: int) -> None:
    """Send a queued operation to its host's worker (after the current transaction)."""
    _enqueue(Operation.objects.get(pk=operation_id))


# --- executors -------------------------------------------------------------------------------


def _progress(op: Operation) -> Callable[[str], None]:
    def report(message: str) -> None:
        Operation.objects.filter(pk=op.pk).update(progress=message[:200])
        events.event_operation(operation=op)
        _failpoint(f"{op.kind}:{message}")

    return report


def _failpoint(name: str) -> None:
    """Test-only pauses (settings.STRATUS_FAILPOINTS); a no-op in every deployment."""
    for item in filter(None, settings.STRATUS_FAILPOINTS.split(",")):
        point, _, seconds = item.rpartition(":")
        if point == name:
            time.sleep(float(seconds))


def _record_console(vm: Vm, hv: hypervisor.Hypervisor | None = None) -> None:
    """Keep the running VM's VNC endpoint where the console proxy reads it (the DB).

    A VM whose console cannot be read is still running: its console is just unavailable.
    """
    try:
        endpoint = (hv or _hv(vm)).console(vm.domain_name)
    except HypervisorUnavailable:
        raise
    except HypervisorError as error:
        log.warning("no console endpoint for %s: %s", vm, error)
        Vm.objects.filter(pk=vm.pk).update(vnc_host="", vnc_port=None, vnc_socket="")
        return
    Vm.objects.filter(pk=vm.pk).update(
        vnc_host=endpoint.host if endpoint.kind == "tcp" else "",
        vnc_port=endpoint.port if endpoint.kind == "tcp" else None,
        vnc_socket=endpoint.path if endpoint.kind == "unix" else "",
    )


def _close_consoles(vm: Vm, reason: str) -> None:
    """The VM is going away or changing under its consoles: end them, forget the endpoint."""
    Vm.objects.filter(pk=vm.pk).update(vnc_host="", vnc_port=None, vnc_socket="")
    consoles.console_revoke(vm_id=vm.pk, reason=reason)


def _observe(vm: Vm, state: str, message: str | None = None) -> None:
    changed = state != vm.observed_state or (message is not None and message != vm.status_message)
    fields = {"observed_state": state, "observed_at": timezone.now()}
    if message is not None:
        fields["status_message"] = message
    Vm.objects.filter(pk=vm.pk).update(**fields)
    vm.observed_state = state
    if changed:  # reconcile observes every VM every minute: only changes are news
        events.event_vm(vm=vm)


def _hv(vm: Vm) -> hypervisor.Hypervisor:
    return hypervisor.hypervisor_for(vm.host.uri, host_name=vm.host.name)


def _spec(vm: Vm) -> VmSpec:
    host = vm.host
    return VmSpec(
        name=vm.domain_name,
        uuid=str(vm.uuid),
        title=f"{vm.group.name} / {vm.name}",
        description=f"Stratus VM {vm.name} of group {vm.group.name} ({vm.group.course.slug})",
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        disk_gib=vm.disk_gib,
        base_image=vm.image.path,
        storage_dir=host.storage_dir,
        virt_type=_hv(vm).resolve_virt_type(host.virt_type),
        network=host.network_mode,
        ssh_port=vm.ssh_port if host.network_mode == "user" else None,
        bridge=host.bridge,
        metadata={"vm": str(vm.pk), "group": str(vm.group_id), "course": vm.group.course.slug},
    )


def _seed(vm: Vm) -> bytes:
    members = vm.group.memberships.select_related("user").order_by("user__username")
    usernames = [m.user.get_username() for m in members]
    return cloudinit.seed_build(
        instance_id=vm.instance_id,
        hostname=cloudinit.hostname_for(f"{vm.group.name}-{vm.name}"),
        login_user=vm.image.login_user,
        extra_users=[u for u in usernames if cloudinit.is_valid_username(u)],
        ssh_public_key=vm.group.ssh_public_key,
    )


def _run_provision(op: Operation) -> None:
    vm = op.vm
    hv = _hv(vm)
    hv.provision(_spec(vm), seed_iso=_seed(vm), progress=_progress(op))
    _record_console(vm, hv)
    _observe(vm, ObservedState.RUNNING, "")


def _run_start(op: Operation) -> None:
    hv = _hv(op.vm)
    hv.start(op.vm.domain_name)
    _record_console(op.vm, hv)
    Vm.objects.filter(pk=op.vm.pk).update(desired_state=DesiredState.RUNNING)
    _observe(op.vm, ObservedState.RUNNING, "")


def _run_stop(op: Operation) -> None:
    _close_consoles(op.vm, "the VM is shutting down")
    clean = _hv(op.vm).shutdown(op.vm.domain_name, timeout=settings.VM_SHUTDOWN_TIMEOUT)
    Vm.objects.filter(pk=op.vm.pk).update(desired_state=DesiredState.STOPPED)
    _observe(op.vm, ObservedState.SHUTOFF, "")
    if not clean:
        _progress(op)("the guest did not shut down in time; it was forced off")


def _run_reboot(op: Operation) -> None:
    _hv(op.vm).reboot(op.vm.domain_name)


def _run_force_off(op: Operation) -> None:
    _close_consoles(op.vm, "the VM was forced off")
    _hv(op.vm).force_off(op.vm.domain_name)
    Vm.objects.filter(pk=op.vm.pk).update(desired_state=DesiredState.STOPPED)
    _observe(op.vm, ObservedState.SHUTOFF, "")


def _run_snapshot(op: Operation) -> None:
    name, with_memory = op.params["name"], bool(op.params.get("with_memory"))
    _hv(op.vm).snapshot_create(op.vm.domain_name, name, with_memory=with_memory)
    Snapshot.objects.get_or_create(
        vm=op.vm, name=name, defaults={"with_memory": with_memory, "created_by": op.requested_by}
    )


def _run_revert(op: Operation) -> None:
    vm = op.vm
    hv = _hv(vm)
    _close_consoles(vm, "the VM is being reverted to a snapshot")
    hv.snapshot_revert(vm.domain_name, op.params["name"])
    state = _DOMAIN_STATES.get(hv.state(vm.domain_name), ObservedState.UNKNOWN)
    if state == ObservedState.RUNNING:
        _record_console(vm, hv)
    desired = DesiredState.RUNNING if state == ObservedState.RUNNING else DesiredState.STOPPED
    Vm.objects.filter(pk=vm.pk).update(desired_state=desired)
    _observe(vm, state, "")


def _run_snapshot_delete(op: Operation) -> None:
    _hv(op.vm).snapshot_delete(op.vm.domain_name, op.params["name"])
    Snapshot.objects.filter(vm=op.vm, name=op.params["name"]).delete()


def _run_reset(op: Operation) -> None:
    vm = op.vm
    vm.instance_id = uuid.uuid4().hex  # cloud-init runs again: keys, users, hostname
    Vm.objects.filter(pk=vm.pk).update(instance_id=vm.instance_id)
    _close_consoles(vm, "the VM is being reset to its baseline")
    hv = _hv(vm)
    hv.reset(_spec(vm), seed_iso=_seed(vm))
    _record_console(vm, hv)
    Snapshot.objects.filter(vm=vm).delete()
    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.RUNNING)
    _observe(vm, ObservedState.RUNNING, "")


def _run_delete(op: Operation) -> None:
    vm = op.vm
    _close_consoles(vm, "the VM is being deleted")
    _hv(vm).delete(_spec(vm))
    Snapshot.objects.filter(vm=vm).delete()
    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.DELETED, ssh_port=None)
    _observe(vm, ObservedState.DELETED, "")


_EXECUTORS: dict[str, Callable[[Operation], None]] = {
    OperationKind.PROVISION: _run_provision,
    OperationKind.START: _run_start,
    OperationKind.STOP: _run_stop,
    OperationKind.REBOOT: _run_reboot,
    OperationKind.FORCE_OFF: _run_force_off,
    OperationKind.SNAPSHOT: _run_snapshot,
    OperationKind.REVERT: _run_revert,
    OperationKind.SNAPSHOT_DELETE: _run_snapshot_delete,
    OperationKind.RESET: _run_reset,
    OperationKind.DELETE: _run_delete,
}


# --- reconcile ---------------------------------------------------------------------------------


# libvirt's domain states as the pages show them.
_DOMAIN_STATES = {
    "running": ObservedState.RUNNING,
    "blocked": ObservedState.RUNNING,
    "shutdown": ObservedState.RUNNING,  # shutting down, not yet off
    "paused": ObservedState.PAUSED,
    "suspended": ObservedState.PAUSED,
    "shutoff": ObservedState.SHUTOFF,
    "crashed": ObservedState.CRASHED,
}


@dataclass
class ReconcileReport:
    host: str
    reachable: bool
    observed: int = 0
    drift: list[str] | None = None
    restarted: int = 0


def host_reconcile(*, host: Host) -> ReconcileReport:
    """Compare desired and observed state on one host; restart what should be running.

    A host that does not answer marks its VMs ``unknown``: no record is ever deleted or
    re-created because a host was unreachable.
    """
    report = ReconcileReport(host=host.name, reachable=True, drift=[])
    vms = list(
        Vm.objects.filter(host=host)
        .exclude(desired_state=DesiredState.DELETED)
        .exclude(observed_state=ObservedState.NEW)
        .select_related("group")
    )
    try:
        domains = hypervisor.hypervisor_for(host.uri, host_name=host.name).states()
    except HypervisorError as error:
        report.reachable = False
        Host.objects.filter(pk=host.pk).update(last_error=str(error)[:2000])
        Vm.objects.filter(pk__in=[v.pk for v in vms]).update(
            observed_state=ObservedState.UNKNOWN, observed_at=timezone.now()
        )
        for vm in vms:
            if vm.observed_state != ObservedState.UNKNOWN:
                events.event_vm(vm=vm)
        log.warning("reconcile: host %s did not answer: %s", host.name, error)
        return report
    Host.objects.filter(pk=host.pk).update(last_seen_at=timezone.now(), last_error="")
    busy = set(
        Operation.objects.filter(vm__in=vms, status__in=ACTIVE_OPERATION_STATUSES).values_list(
            "vm_id", flat=True
        )
    )
    for vm in vms:
        if vm.pk in busy:
            continue  # its operation will set the state
        domain = domains.get(str(vm.uuid))
        state = _DOMAIN_STATES.get(domain.state, ObservedState.UNKNOWN) if domain else "missing"
        report.observed += 1
        if state != vm.observed_state:
            report.drift.append(f"{vm}: {vm.observed_state} → {state}")
            log.info("reconcile: %s observed %s (was %s)", vm, state, vm.observed_state)
        message = None
        if state == ObservedState.MISSING:
            message = "The VM is missing on its host; an instructor can reset it."
        if state != ObservedState.RUNNING and vm.observed_state == ObservedState.RUNNING:
            _close_consoles(vm, f"the VM is {state}")
        _observe(vm, state, message)
        if vm.desired_state == DesiredState.RUNNING and state in (
            ObservedState.SHUTOFF,
            ObservedState.CRASHED,
        ):
            _operation_new(vm=vm, kind=OperationKind.START, by=None)
            report.restarted += 1
    return report


def vms_place_waiting() -> int:
    """Place VMs that waited for capacity, and send their provisioning."""
    placed = 0
    waiting = Vm.objects.filter(host__isnull=True).exclude(desired_state=DesiredState.DELETED)
    for vm in waiting:
        if vm_place(vm=vm):
            placed += 1
            events.event_vm(vm=vm)
            for op in vm.operations.filter(status=OperationStatus.QUEUED):
                _enqueue(op)
    return placed


def reconcile_all() -> tuple[int, list[ReconcileReport]]:
    """Place waiting VMs, then reconcile every host that is enabled or holds VMs."""
    placed = vms_place_waiting()
    hosts = Host.objects.filter(Q(enabled=True) | Q(vms__isnull=False)).distinct()
    return placed, [host_reconcile(host=host) for host in hosts]
