"""The Firewall card of the group page (labs/views_firewall.py) for the cast: a member
opens and closes ports, a teammate sees the rules, another group's member gets a 404 and
changes nothing, anonymous users are sent to sign in, the instructor locks a rule (the
members then cannot remove it) and removes any, every form needs its CSRF token and a
POST, and a refusal reads as a message saying what was wrong."""

import pytest
from django.test import Client
from django.urls import reverse

from labs.choices import OperationKind
from labs.compute import networks
from labs.models import FirewallRule, Operation

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    """Deliveries recorded instead of sent to the broker."""
    from labs.compute import dispatch

    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "t-1")
    return ids


@pytest.fixture
def vms(group_a, group_b, make_vm, sent):
    """Group A's VM on a host with group networks (so the group has its network)."""
    vm_a, vm_b = make_vm(group_a, ssh_port=22000), make_vm(group_b, ssh_port=22001)
    vm_a.host.group_networks = True
    vm_a.host.save(update_fields=["group_networks"])
    networks.vm_network_join(vm=vm_a)
    return vm_a, vm_b


def page_of(client, group) -> str:
    return client.get(reverse("labs:group_detail", args=[group.pk])).content.decode()


def add(client, group, **fields):
    data = {"protocol": "tcp", "port_from": "8080", "port_to": "", "source": "group", **fields}
    return client.post(reverse("labs:firewall_rule_add", args=[group.pk]), data, follow=True)


def test_the_card_shows_the_default_rules_to_the_members(client_for, bob, vms):
    vm_a, _ = vms
    page = page_of(client_for(bob), vm_a.group)
    assert 'id="firewall"' in page and "Firewall" in page
    assert "the instructor&#x27;s gateway" in page and "ICMP" in page


def test_a_member_opens_a_port_and_a_teammate_closes_it(client_for, alice, bob, vms):
    vm_a, _ = vms
    page = add(client_for(alice), vm_a.group, note="web").content.decode()
    assert "Opening tcp 8080 from the group&#x27;s VMs: it takes effect within seconds." in page
    rule = FirewallRule.objects.get(port_from=8080)
    op = Operation.objects.get(kind=OperationKind.FIREWALL_SYNC)
    assert (op.vm, op.requested_by, rule.created_by) == (vm_a, alice, alice)
    Operation.objects.update(status="succeeded")
    url = reverse("labs:firewall_rule_remove", args=[rule.pk])
    page = client_for(bob).post(url, follow=True).content.decode()
    assert "Closing tcp 8080 from the group&#x27;s VMs" in page
    assert not FirewallRule.objects.filter(pk=rule.pk).exists()
    assert Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC, status="queued").count() == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port_from": "70000"}, "from 1 to 65535"),
        ({"port_from": "90", "port_to": "80"}, "must not be above"),
        ({"protocol": "icmp", "port_from": "8"}, "ICMP has no ports"),
        ({"port_from": "22"}, "has this rule already"),  # a default
    ],
)
def test_a_bad_rule_reads_as_a_message_and_changes_nothing(
    client_for, alice, vms, fields, message
):
    vm_a, _ = vms
    before = FirewallRule.objects.count()
    page = add(client_for(alice), vm_a.group, **fields).content.decode()
    assert message in page
    assert FirewallRule.objects.count() == before
    assert not Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC).exists()


def test_the_instructor_locks_a_rule_and_the_members_cannot_remove_it(
    client_for, alice, ines, vms
):
    vm_a, _ = vms
    rule = FirewallRule.objects.get(source="gateway")
    client = client_for(ines)
    page = page_of(client, vm_a.group)
    assert reverse("labs:firewall_rule_lock", args=[rule.pk]) in page  # staff see Lock
    client.post(reverse("labs:firewall_rule_lock", args=[rule.pk]), {"locked": "1"})
    assert FirewallRule.objects.get(pk=rule.pk).locked
    client = client_for(alice)
    page = page_of(client, vm_a.group)
    assert reverse("labs:firewall_rule_lock", args=[rule.pk]) not in page
    assert reverse("labs:firewall_rule_remove", args=[rule.pk]) not in page and "locked" in page
    reply = client.post(reverse("labs:firewall_rule_remove", args=[rule.pk]), follow=True)
    assert "is locked by your instructor" in reply.content.decode()
    assert FirewallRule.objects.filter(pk=rule.pk).exists()
    reply = client.post(reverse("labs:firewall_rule_lock", args=[rule.pk]), {"locked": "0"})
    assert FirewallRule.objects.get(pk=rule.pk).locked  # a member cannot unlock
    client_for(ines).post(reverse("labs:firewall_rule_remove", args=[rule.pk]))
    assert not FirewallRule.objects.filter(pk=rule.pk).exists()  # the instructor overrides


def test_the_instructor_adds_a_locked_rule_to_any_group(client_for, ines, vms):
    vm_a, _ = vms
    add(client_for(ines), vm_a.group, protocol="udp", port_from="5000", port_to="5010",
        source="gateway", locked="1")  # fmt: skip
    rule = FirewallRule.objects.get(port_from=5000)
    assert (rule.port_to, rule.locked, rule.created_by) == (5010, True, ines)


def test_another_groups_member_gets_a_404_and_changes_nothing(client_for, carol, vms):
    vm_a, _ = vms
    rule = FirewallRule.objects.filter(group=vm_a.group).first()
    client = client_for(carol)
    before = FirewallRule.objects.count()
    assert add(client, vm_a.group).status_code == 404
    assert client.post(reverse("labs:firewall_rule_remove", args=[rule.pk])).status_code == 404
    assert client.post(reverse("labs:firewall_rule_lock", args=[rule.pk])).status_code == 404
    assert FirewallRule.objects.count() == before and not rule.locked


def test_anonymous_users_are_sent_to_sign_in(client, vms):
    vm_a, _ = vms
    rule = FirewallRule.objects.filter(group=vm_a.group).first()
    for url in (
        reverse("labs:firewall_rule_add", args=[vm_a.group_id]),
        reverse("labs:firewall_rule_remove", args=[rule.pk]),
    ):
        reply = client.post(url)
        assert reply.status_code == 302 and "/login" in reply["Location"]
    assert FirewallRule.objects.filter(pk=rule.pk).exists()


def test_a_post_without_its_csrf_token_is_refused_and_a_get_is_not_allowed(alice, vms):
    vm_a, _ = vms
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    url = reverse("labs:firewall_rule_add", args=[vm_a.group_id])
    assert client.post(url, {"protocol": "icmp", "source": "gateway"}).status_code == 403
    assert client.get(url).status_code == 405
    assert not FirewallRule.objects.filter(protocol="icmp", source="gateway").exists()
