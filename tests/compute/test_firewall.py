"""The group's firewall (labs/compute/firewall.py): the defaults every group network
starts with, what a rule may be (clear refusals), who may change which rule, and each
change queued as a ``firewall_sync`` on every host of the group, whose executor redefines
the group's filter (on libvirt's test driver, which has no nwfilters: the XML is
tests/drivers/test_libvirt_firewall.py's)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import pytest
from django.db import IntegrityError, transaction

from labs.choices import OperationKind
from labs.compute import firewall, networks, runner
from labs.errors import Invalid, NotAllowed, OverQuota, Refused
from labs.models import FirewallRule, Operation, Vm
from tests.compute.test_vms import (  # noqa: F401 - fixture
    approve,
    image,  # noqa: F401 - fixture
    make_host,
    template,
)

pytestmark = pytest.mark.django_db


def labels(group):
    return [r.label for r in firewall.rules_of_group(group=group)]


def run(op):
    outcome = runner.operation_run(operation_id=op.pk, worker="w/1", may_retry=False)
    op.refresh_from_db()
    assert op.status == "succeeded", (outcome, op.error)
    return op


@pytest.fixture
def on_network(group_a, make_vm, tmp_path):
    """Group A (approved) with a VM on each of two hosts that have group networks."""
    Vm.objects.all().delete()
    h1 = make_host("h1", tmp_path=tmp_path, group_networks=True)
    h2 = make_host("h2", tmp_path=tmp_path, group_networks=True)
    vms = [make_vm(group_a, name="vm1", host=h1), make_vm(group_a, name="vm2", host=h2)]
    for vm in vms:
        networks.vm_network_join(vm=vm)
    return vms


def test_a_group_network_starts_with_ssh_from_the_gateway_and_the_group_and_ping(group_a):
    networks.group_network_get(group=group_a)
    assert labels(group_a) == [
        "icmp from the group's VMs",
        "tcp 22 from the instructor's gateway",
        "tcp 22 from the group's VMs",
    ]
    assert firewall.firewall_defaults_ensure(group=group_a) == 0  # once


def test_a_group_without_a_network_has_no_rules_and_no_firewall_card(group_a):
    assert labels(group_a) == [] and not firewall.shown(group=group_a)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "tcp", "port_from": "0"}, "first port must be a whole number from 1"),
        ({"protocol": "tcp", "port_from": "65536"}, "from 1 to 65535"),
        ({"protocol": "udp", "port_from": "80", "port_to": "70000"}, "last port"),
        (
            {"protocol": "tcp", "port_from": "9000", "port_to": "8000"},
            r"\(9000\) must not be above",
        ),
        ({"protocol": "tcp", "port_from": "http"}, "whole number"),
        ({"protocol": "tcp"}, "needs a port"),
        ({"protocol": "icmp", "port_from": "8"}, "ICMP has no ports"),
        ({"protocol": "sctp", "port_from": "80"}, "Choose the protocol"),
        ({"protocol": "tcp", "port_from": "80", "source": "course"}, "Choose where it may come"),
    ],
)
def test_a_bad_rule_is_refused_with_a_clear_message(group_a, alice, make_vm, fields, message):
    make_vm(group_a)
    fields = {"source": "group", **fields}
    with pytest.raises(Invalid, match=message):
        firewall.rule_add(group=group_a, by=alice, **fields)
    assert not FirewallRule.objects.exists()


def test_a_single_port_is_a_range_of_one_and_the_note_is_one_line(group_a, alice, make_vm):
    make_vm(group_a)
    rule = firewall.rule_add(
        group=group_a, by=alice, protocol="TCP", port_from=" 8080 ", source="group",
        note="web\nserver",
    )  # fmt: skip
    assert (rule.protocol, rule.port_from, rule.port_to, rule.note) == (
        "tcp",
        8080,
        8080,
        "web server",
    )
    assert rule.created_by == alice and rule.label == "tcp 8080 from the group's VMs"


def test_a_duplicate_is_refused_and_the_database_holds_it_too(group_a, alice, make_vm):
    make_vm(group_a)
    firewall.rule_add(group=group_a, by=alice, protocol="udp", port_from=53, source="gateway")
    with pytest.raises(Refused, match="has this rule already"):
        firewall.rule_add(group=group_a, by=alice, protocol="udp", port_from=53, source="gateway")
    firewall.rule_add(group=group_a, by=alice, protocol="icmp", source="gateway")
    with pytest.raises(IntegrityError), transaction.atomic():
        FirewallRule.objects.create(group=group_a, protocol="icmp", source="gateway")
    with pytest.raises(IntegrityError), transaction.atomic():
        FirewallRule.objects.create(group=group_a, protocol="tcp", source="group")  # no ports


def test_a_group_has_at_most_rules_max_rules(group_a, alice, make_vm):
    make_vm(group_a)
    for port in range(1, firewall.RULES_MAX + 1):
        FirewallRule.objects.create(
            group=group_a, protocol="tcp", port_from=port, port_to=port, source="group"
        )
    with pytest.raises(OverQuota, match=f"at most {firewall.RULES_MAX} firewall rules"):
        firewall.rule_add(group=group_a, by=alice, protocol="tcp", port_from=999, source="group")


def test_members_cannot_lock_nor_change_a_locked_rule_and_staff_can(group_a, alice, ines, make_vm):
    make_vm(group_a)
    with pytest.raises(NotAllowed):
        firewall.rule_add(
            group=group_a, by=alice, protocol="tcp", port_from=25, source="group", locked=True
        )
    rule = firewall.rule_add(
        group=group_a, by=ines, protocol="tcp", port_from=25, source="group", locked=True
    )
    with pytest.raises(Refused, match="locked by your instructor"):
        firewall.rule_remove(rule=rule, by=alice)
    with pytest.raises(NotAllowed):
        firewall.rule_lock(rule=rule, by=alice, locked=False)
    firewall.rule_lock(rule=rule, by=ines, locked=False)
    firewall.rule_remove(rule=rule, by=alice)  # unlocked: the members' again
    assert not FirewallRule.objects.filter(pk=rule.pk).exists()


def test_another_group_or_another_course_may_not_change_the_firewall(
    group_a, group_b, carol, olga, make_vm
):
    make_vm(group_a)
    for outsider in (carol, olga):
        with pytest.raises(NotAllowed):
            firewall.rule_add(group=group_a, by=outsider, protocol="icmp", source="group")


def test_a_change_queues_one_firewall_sync_per_host_of_the_group(on_network, group_a, alice, sent):
    vm1, vm2 = on_network
    rule = firewall.rule_add(
        group=group_a, by=alice, protocol="tcp", port_from=8080, source="group"
    )
    ops = Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC).order_by("vm__host__name")
    assert [(op.vm, op.requested_by, op.params["name"]) for op in ops] == [
        (vm1, alice, "open tcp 8080 from the group's VMs"),
        (vm2, alice, "open tcp 8080 from the group's VMs"),
    ]
    assert sorted(sent) == sorted(op.pk for op in ops)  # sent to the hosts' workers
    for op in ops:
        run(op)
        assert op.params["timings"]["firewall_s"] >= 0
    firewall.rule_remove(rule=rule, by=alice)
    closing = Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC, status="queued")
    assert {op.params["name"] for op in closing} == {"close tcp 8080 from the group's VMs"}
    assert closing.count() == 2


def test_a_host_whose_vms_are_all_busy_gets_no_second_operation(on_network, group_a, alice, sent):
    vm1, _vm2 = on_network
    from labs.compute import dispatch

    dispatch.operation_create(vm=vm1, kind=OperationKind.NETWORK_SYNC, by=None)
    firewall.rule_add(group=group_a, by=alice, protocol="icmp", source="gateway")
    ops = Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC)
    assert [op.vm.name for op in ops] == ["vm2"]  # vm1's network_sync applies it there


def test_the_network_spec_carries_the_rules_and_the_nic_its_groups_filter(on_network, group_a):
    vm1, _ = on_network
    spec = networks.network_spec(group=group_a, host=vm1.host)
    assert spec.firewall_filter == f"stratus-fw-g{group_a.pk}"
    assert {(o.protocol, o.source, o.port_from) for o in spec.firewall} == {
        ("tcp", "gateway", 22),
        ("tcp", "group", 22),
        ("icmp", "group", None),
    }
    assert networks.nic_spec(vm1).filter == spec.firewall_filter


def test_a_host_busy_with_another_operation_catches_up_once_it_is_idle(
    on_network, group_a, alice, sent
):
    """A change while the host's only VM of the group takes a snapshot: that host is
    marked behind, and the sweeper gives it its sync once the VM is idle, once."""
    from labs.compute import dispatch
    from labs.models import GroupNetwork

    vm1, vm2 = on_network
    snapshot = dispatch.operation_create(
        vm=vm1, kind=OperationKind.SNAPSHOT, by=alice, params={"name": "s1"}
    )
    firewall.rule_add(group=group_a, by=alice, protocol="tcp", port_from=8080, source="group")
    [now] = Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC)
    assert now.vm == vm2
    run(now)
    assert firewall.syncs_due_request() == []  # vm1 is still busy
    Operation.objects.filter(pk=snapshot.pk).update(status="succeeded")  # its snapshot ends

    [late] = firewall.syncs_due_request()
    assert (late.vm, late.params["name"]) == (vm1, "catch up")
    assert firewall.syncs_due_request() == []  # tried since the change: not twice
    run(late)
    network = GroupNetwork.objects.get(group=group_a)
    wanted = network.firewall_wanted_at.isoformat()
    assert network.firewall_applied == {str(vm1.host_id): wanted, str(vm2.host_id): wanted}

    firewall.rule_add(group=group_a, by=alice, protocol="udp", port_from=53, source="group")
    for op in Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC, status="queued"):
        run(op)
    assert firewall.syncs_due_request() == []  # both hosts hold the latest change
