"""A firewall the group controls (issue #12, docs/networking.md "The firewall"): the
inbound rules of its VMs' group NICs (``grp0``).

Every group starts with SSH (tcp 22) from the instructor's gateway and from the group's
VMs, and ICMP from the group's VMs (``ping vm2``); everything else that reaches ``grp0``
unasked is dropped, and replies to what a VM opened itself always pass. The group's
members add and remove openings on the group page; the course's staff see every group's,
may add and remove any, and lock one (its members then see it and cannot change it).

The rows are the truth (labs/models/firewall.py). Each change asks every host of the
group for a ``firewall_sync`` operation (on one idle VM of the group there: the audit row
and the page's live update), whose worker redefines the group's nwfilter there; libvirt
applies it to the running NICs at once. A host whose VMs are all busy is left to their
own operation when it brings the group network up to date (a start, a provision, a
``network_sync``: ``network_ensure`` defines the firewall too); otherwise to the next change.

The management NIC (QEMU user mode, SSH and published ports only) is not behind this
firewall: nwfilter cannot reach into QEMU's slirp, and it has nothing but its forwards.
"""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.http import Http404
from django.utils import timezone

from labs import access
from labs.access import Action
from labs.choices import ACTIVE_OPERATION_STATUSES, FirewallProtocol, FirewallSource, OperationKind
from labs.compute import dispatch
from labs.drivers.base import FirewallOpening
from labs.errors import Busy, Invalid, NotAllowed, OverQuota, Refused
from labs.live import events
from labs.models import FirewallRule, Group, GroupNetwork, Operation, Vm
from labs.models.firewall import NOTE_MAX

log = logging.getLogger(__name__)

RULES_MAX = 32  # per group: a screenful, and a short chain on every packet
# (protocol, port_from, port_to, source, note): what every group network starts with.
DEFAULTS = (
    (FirewallProtocol.TCP, 22, 22, FirewallSource.GATEWAY, "SSH from the instructor's gateway"),
    (FirewallProtocol.TCP, 22, 22, FirewallSource.GROUP, "ssh vm2"),
    (FirewallProtocol.ICMP, None, None, FirewallSource.GROUP, "ping vm2"),
)


# --- reads ---------------------------------------------------------------------------------


def rules_of_group(*, group: Group) -> list[FirewallRule]:
    return list(FirewallRule.objects.filter(group=group).order_by(*FirewallRule._meta.ordering))


def rule_for_user(*, user: AbstractBaseUser, rule_id: int) -> FirewallRule:
    """A rule the user may view (its group's member, course staff); else 404."""
    rule = (
        access.restrict(FirewallRule.objects.all(), user=user, action=Action.VIEW)
        .select_related("group__course")
        .filter(pk=rule_id)
        .first()
    )
    if rule is None:
        raise Http404("No such firewall rule.")
    return rule


def shown(*, group: Group) -> bool:
    """Whether the group page shows the firewall: the group has a group network."""
    return GroupNetwork.objects.filter(group=group).exists()


def openings(*, group: Group) -> tuple[FirewallOpening, ...]:
    """The group's rules as the driver takes them."""
    return tuple(
        FirewallOpening(
            protocol=r.protocol, source=r.source, port_from=r.port_from, port_to=r.port_to
        )
        for r in FirewallRule.objects.filter(group=group).order_by("pk")
    )


def is_staff_for(*, user: AbstractBaseUser | None, group: Group) -> bool:
    return user is not None and access.is_course_staff(user=user, course=group.course_id)


# --- validation ------------------------------------------------------------------------------


def _port(value, what: str) -> int:
    text = str(value if value is not None else "").strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid(f"The {what} port must be a whole number from 1 to 65535.")
    return int(text)


def rule_clean(*, protocol, port_from, port_to, source, note="") -> dict:
    """A rule from a form: protocol tcp/udp/icmp, ports 1-65535 (one port when ``port_to``
    is empty; none for icmp), source group or gateway. The fields to create it with."""
    protocol = str(protocol or "").strip().lower()
    if protocol not in FirewallProtocol.values:
        raise Invalid("Choose the protocol: TCP, UDP or ICMP.")
    source = str(source or "").strip().lower()
    if source not in FirewallSource.values:
        raise Invalid(
            "Choose where it may come from: the group's VMs or the instructor's gateway."
        )
    first = str(port_from if port_from is not None else "").strip()
    last = str(port_to if port_to is not None else "").strip()
    if protocol == FirewallProtocol.ICMP:
        if first or last:
            raise Invalid("ICMP has no ports: leave the ports empty.")
        low = high = None
    else:
        if not first:
            raise Invalid(f"A {protocol.upper()} rule needs a port (22, or 8000 to 8099).")
        low = _port(first, "first")
        high = _port(last, "last") if last else low
        if low > high:
            raise Invalid(f"The first port ({low}) must not be above the last ({high}).")
    note = " ".join(str(note or "").split())[:NOTE_MAX]
    return {
        "protocol": protocol,
        "port_from": low,
        "port_to": high,
        "source": source,
        "note": note,
    }


def _operator(*, group: Group, by: AbstractBaseUser | None) -> bool:
    """Whether ``by`` may change the group's firewall; True when they are its course's
    staff (who may change locked rules too)."""
    if by is None:
        return True  # Stratus itself (defaults)
    if not access.may(by, Action.OPERATE, group):
        raise NotAllowed("You may not change this group's firewall.")
    return is_staff_for(user=by, group=group)


# --- writes ----------------------------------------------------------------------------------


def firewall_defaults_ensure(*, group: Group) -> int:
    """The group's default rules, once (a group that has rules keeps them as they are).
    How many were made."""
    if FirewallRule.objects.filter(group=group).exists():
        return 0
    made = 0
    for protocol, low, high, source, note in DEFAULTS:
        _, created = FirewallRule.objects.get_or_create(
            group=group,
            protocol=protocol,
            port_from=low,
            port_to=high,
            source=source,
            defaults={"note": note},
        )
        made += created
    return made


def rule_add(
    *,
    group: Group,
    by: AbstractBaseUser | None,
    protocol,
    port_from=None,
    port_to=None,
    source,
    note: str = "",
    locked: bool = False,
) -> FirewallRule:
    """Open the group's VMs to ``protocol`` on the ports from ``source``; applied on every
    host of the group within seconds."""
    fields = rule_clean(
        protocol=protocol, port_from=port_from, port_to=port_to, source=source, note=note
    )
    staff = _operator(group=group, by=by)
    if locked and not staff:
        raise NotAllowed("Only the course's staff lock firewall rules.")
    try:
        with transaction.atomic():
            group = Group.objects.select_for_update().get(pk=group.pk)
            rules = FirewallRule.objects.filter(group=group)
            same = {k: fields[k] for k in ("protocol", "port_from", "port_to", "source")}
            if rules.filter(**same).exists():
                raise Refused("Your group has this rule already.")
            if rules.count() >= RULES_MAX:
                raise OverQuota(
                    f"A group has at most {RULES_MAX} firewall rules: remove one first "
                    "(a port range is one rule)."
                )
            rule = FirewallRule.objects.create(group=group, created_by=by, locked=locked, **fields)
            firewall_sync_request(group=group, by=by, what=f"open {rule.label}")
    except IntegrityError:
        raise Refused("Your group has this rule already.") from None
    log.info("group %s firewall: %s opened by %s", group, rule.label, by)
    return rule


def rule_remove(*, rule: FirewallRule, by: AbstractBaseUser | None) -> None:
    """Close an opening (a locked one: the course's staff only)."""
    group = rule.group
    staff = _operator(group=group, by=by)
    if rule.locked and not staff:
        raise Refused(f"“{rule.label}” is locked by your instructor: it stays.")
    label = rule.label
    with transaction.atomic():
        Group.objects.select_for_update().get(pk=group.pk)
        deleted, _ = FirewallRule.objects.filter(pk=rule.pk).delete()
        if not deleted:
            raise Refused("That rule is gone already.")
        firewall_sync_request(group=group, by=by, what=f"close {label}")
    log.info("group %s firewall: %s closed by %s", group, label, by)


def rule_lock(*, rule: FirewallRule, by: AbstractBaseUser | None, locked: bool) -> FirewallRule:
    """Lock a rule (its group's members cannot change or remove it) or unlock it: the
    course's staff only. Nothing changes on the hosts."""
    if not _operator(group=rule.group, by=by):
        raise NotAllowed("Only the course's staff lock and unlock firewall rules.")
    FirewallRule.objects.filter(pk=rule.pk).update(locked=locked)
    rule.locked = locked
    events.group_changed(group=rule.group)
    return rule


def firewall_sync_request(
    *, group: Group, by: AbstractBaseUser | None, what: str = ""
) -> list[Operation]:
    """A ``firewall_sync`` on one idle VM of the group on each of its hosts (the page
    updates live with the rules and the operations). A host whose VMs are all busy is
    marked behind and gets its sync from the sweeper once one is idle. The operations
    made."""
    events.group_changed(group=group)
    GroupNetwork.objects.filter(group=group).update(firewall_wanted_at=timezone.now())
    made = []
    for host_id in sorted(set(_on_network(group).values_list("host_id", flat=True))):
        op = _sync_on_host(group=group, host_id=host_id, by=by, what=what)
        if op is not None:
            made.append(op)
    return made


def _on_network(group: Group):
    return (
        Vm.objects.live()
        .filter(group=group, group_ip__isnull=False, host__group_networks=True)
        .order_by("host_id", "pk")
    )


def _sync_on_host(*, group: Group, host_id: int, by, what: str) -> Operation | None:
    target = (
        _on_network(group)
        .filter(host_id=host_id)
        .exclude(operations__status__in=ACTIVE_OPERATION_STATUSES)
        .first()
    )
    if target is None:
        log.info("group %s: every VM on host %s is busy; the firewall waits", group, host_id)
        return None
    try:
        return dispatch.operation_create(
            vm=target, kind=OperationKind.FIREWALL_SYNC, by=by, params={"name": what}
        )
    except Busy:  # it took an operation meanwhile: the sweeper comes back
        return None


def wanted_at(*, group: Group) -> str:
    """The firewall change the group's hosts must apply (read before its rules are)."""
    network = GroupNetwork.objects.filter(group=group).only("firewall_wanted_at").first()
    stamp = network.firewall_wanted_at if network else None
    return stamp.isoformat() if stamp else ""


def applied_record(*, group: Group, host_id: int, wanted: str) -> None:
    """``host_id`` holds the group's rules of the change ``wanted`` (or a later one)."""
    with transaction.atomic():
        network = GroupNetwork.objects.select_for_update().filter(group=group).first()
        if network is None:
            return
        network.firewall_applied = {**network.firewall_applied, str(host_id): wanted}
        network.save(update_fields=["firewall_applied"])


def syncs_due_request() -> list[Operation]:
    """The sweeper (beat): a ``firewall_sync`` for each host of a group that is behind its
    firewall's last change and has not been tried since (its VMs were all busy then)."""
    made = []
    for network in GroupNetwork.objects.filter(firewall_wanted_at__isnull=False).select_related(
        "group"
    ):
        wanted = network.firewall_wanted_at.isoformat()
        for host_id in sorted(set(_on_network(network.group).values_list("host_id", flat=True))):
            if network.firewall_applied.get(str(host_id)) == wanted:
                continue
            tried = Operation.objects.filter(
                kind=OperationKind.FIREWALL_SYNC,
                vm__group=network.group,
                vm__host_id=host_id,
                created_at__gte=network.firewall_wanted_at,
            )
            if tried.exists():
                continue  # made, running, or failed (the next change tries again)
            op = _sync_on_host(group=network.group, host_id=host_id, by=None, what="catch up")
            if op is not None:
                made.append(op)
    return made
