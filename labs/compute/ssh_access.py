"""SSH access inside the guests follows the group: its members and its key.

The cloud-init seed gives a new (or reset) VM the group's key for the image's login user
and one account per member. After that, a member who leaves or joins, or a new group key,
changes the guests through their agent: an ``ssh_sync`` Operation, which a worker runs
like any other (``executors.ssh_sync``).

The VM row says when its access last changed (``ssh_wanted_at``) and when the guest last
got it (``ssh_synced_at``). A change marks every VM of the group and asks at once for a
sync on those running and idle; the rest (busy, stopped, paused) are picked up by the
sweeper (beat, with the outbox's) once they run and are idle. A sync the guest refused
(its agent stopped by root in the guest, say) is not asked again until the next change
or the next start, and its failure stays on the VM's page.
"""

import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from labs.choices import (
    ACTIVE_OPERATION_STATUSES,
    GroupStatus,
    ObservedState,
    OperationKind,
    Role,
)
from labs.compute import dispatch
from labs.drivers import cloudinit
from labs.errors import Busy
from labs.models import Group, Operation, Vm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Access:
    accounts: list[str]  # the login user first, then the members' own accounts
    key: str


def access_wanted(vm: Vm) -> Access:
    """Who should log in to ``vm`` now, with which key: the seed and a sync agree."""
    members = (
        vm.group.memberships.filter(role=Role.STUDENT, user__is_active=True)
        .select_related("user")
        .order_by("user__username")
    )
    accounts = [cloudinit.username_for(vm.image.login_user)]
    for member in members:
        name = member.user.get_username()
        if cloudinit.is_valid_username(name) and cloudinit.username_for(name) not in accounts:
            accounts.append(cloudinit.username_for(name))
    return Access(accounts=accounts, key=vm.group.ssh_public_key.strip())


def access_given(vm: Vm, access: Access, *, since) -> None:
    """The guest holds ``access`` as of ``since`` (when it was read from the rows)."""
    accounts = list(dict.fromkeys([*vm.ssh_accounts, *access.accounts]))
    keys = list(dict.fromkeys([*vm.ssh_keys, access.key]))
    Vm.objects.filter(pk=vm.pk).update(ssh_accounts=accounts, ssh_keys=keys, ssh_synced_at=since)
    vm.ssh_accounts, vm.ssh_keys, vm.ssh_synced_at = accounts, keys, since


def access_reset(vm: Vm, access: Access, *, since) -> None:
    """A fresh disk from the seed: it holds exactly ``access``, nothing older."""
    Vm.objects.filter(pk=vm.pk).update(
        ssh_accounts=access.accounts, ssh_keys=[access.key], ssh_synced_at=since
    )
    vm.ssh_accounts, vm.ssh_keys, vm.ssh_synced_at = access.accounts, [access.key], since


def groups_changed(*, group_ids, left: bool = False) -> None:
    """The members or the key of these groups changed: the guests of the approved ones
    follow (asked after commit). With ``left``, a member left them: each is told to
    replace its key, which that member may still hold."""
    now = timezone.now()
    groups = Group.objects.filter(pk__in=[g for g in group_ids if g], status=GroupStatus.APPROVED)
    if left:
        groups.update(member_left_at=now)
    vm_ids = list(Vm.objects.live().filter(group__in=groups).values_list("pk", flat=True))
    if not vm_ids:
        return
    Vm.objects.filter(pk__in=vm_ids).update(ssh_wanted_at=now)
    transaction.on_commit(lambda: syncs_request(Vm.objects.filter(pk__in=vm_ids)), robust=True)


def vm_access_unknown(vm: Vm) -> None:
    """The guest's disk went back in time (a revert): sync it to what is wanted now."""
    Vm.objects.filter(pk=vm.pk).update(ssh_wanted_at=timezone.now())


_DUE = Q(ssh_wanted_at__isnull=False) & (
    Q(ssh_synced_at__isnull=True) | Q(ssh_synced_at__lt=F("ssh_wanted_at"))
)


def vm_started(vm: Vm) -> None:
    """The VM runs (again): a change it has not got yet gets a fresh try, even if a
    sync failed while it was last running."""
    Vm.objects.filter(_DUE, pk=vm.pk).update(ssh_wanted_at=timezone.now())


def syncs_request(vms) -> list[Operation]:
    """Ask for an ``ssh_sync`` on every VM of ``vms`` that needs one and can take it now:
    running, idle, and not tried since its access last changed."""
    tried = Operation.objects.filter(
        vm=OuterRef("pk"), kind=OperationKind.SSH_SYNC, created_at__gte=OuterRef("ssh_wanted_at")
    )
    busy = Operation.objects.filter(vm=OuterRef("pk"), status__in=ACTIVE_OPERATION_STATUSES)
    candidates = (
        vms.live()
        .filter(_DUE, observed_state=ObservedState.RUNNING, host__isnull=False)
        .exclude(Exists(tried))
        .exclude(Exists(busy))
        .select_related("group")
    )
    created = []
    for vm in candidates:
        try:
            created.append(dispatch.operation_create(vm=vm, kind=OperationKind.SSH_SYNC, by=None))
        except Busy:
            continue  # an operation got there first: the sweeper comes back
    return created


def syncs_due_request() -> int:
    """The sweeper (beat): every running VM whose access changed while it was busy or off."""
    return len(syncs_request(Vm.objects.filter(_DUE)))
