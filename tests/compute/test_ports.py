"""Published ports: allocation from the host's range (unique per host, in the database),
the group's quota, the course's forbidden ports, the refusals, and the operations run
against a driver that records what it was asked (libvirt's test driver keeps no QEMU
command line: the running guest's side is tests/integration/test_one_guest.py;
the XML is tests/drivers/test_libvirt_ports.py)."""

from dataclasses import dataclass, field

import pytest
from django.db import IntegrityError, transaction

from labs.choices import ObservedState, OperationKind, OperationStatus, PortState
from labs.compute import executors, moves, ports, requests, runner
from labs.drivers.base import HypervisorError, PortSpec
from labs.errors import Busy, Invalid, NotAllowed, OverQuota, Refused
from labs.models import Host, Operation, Publication, Vm

pytestmark = pytest.mark.django_db


@dataclass
class Recorder:
    """Stands for a host's driver: what ports_apply was asked, and a refusal to give."""

    calls: list = field(default_factory=list)
    refuse: str = ""

    def ports_apply(self, name, *, ssh_port, ports):
        self.calls.append((name, ssh_port, tuple(ports)))
        if self.refuse and any(p.host_port == 23000 for p in ports):
            raise HypervisorError(self.refuse)
        return 0.01

    def delete(self, spec):
        self.calls.append(("delete", spec.name))

    def resolve_virt_type(self, requested):
        return "qemu"


@pytest.fixture
def driver(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(executors, "driver_of", lambda vm: fake)
    return fake


@pytest.fixture
def vm(group_a, make_vm):
    return make_vm(group_a, ssh_port=22000, instance_id="i-1")


def run(op: Operation) -> Operation:
    runner.operation_run(operation_id=op.pk, worker="t/1", may_retry=False)
    op.refresh_from_db()
    return op


def publish(vm, by, port=80) -> Publication:
    op = ports.port_publish_request(vm=vm, guest_port=port, by=by)
    return Publication.objects.get(pk=op.params["publication"])


def finish_all():
    Operation.objects.update(status=OperationStatus.SUCCEEDED)


# --- allocation ------------------------------------------------------------------------


def test_a_publication_takes_the_lowest_free_port_of_its_hosts_published_range(vm, alice):
    pub = publish(vm, alice)
    assert (pub.host, pub.host_port, pub.guest_port) == (vm.host, 23000, 80)
    assert pub.state == PortState.OPENING
    op = Operation.objects.get(kind=OperationKind.PORT_PUBLISH)
    assert (op.vm, op.requested_by, op.params["name"]) == (vm, alice, "80")


def test_two_groups_on_one_host_never_get_the_same_host_port(vm, alice, carol, group_b, make_vm):
    other = make_vm(group_b, ssh_port=22001)
    first = publish(vm, alice)
    second = publish(other, carol)
    assert (first.host_id, second.host_id) == (vm.host_id, other.host_id)
    assert {first.host_port, second.host_port} == {23000, 23001}


def test_the_database_refuses_a_host_port_twice_on_one_host(vm, group_b, make_vm):
    other = make_vm(group_b, ssh_port=22001)
    Publication.objects.create(vm=vm, host=vm.host, host_port=23005, guest_port=80)
    with pytest.raises(IntegrityError), transaction.atomic():
        Publication.objects.create(vm=other, host=vm.host, host_port=23005, guest_port=80)


def test_a_host_with_no_free_published_port_refuses_naming_itself(vm, alice):
    Host.objects.filter(pk=vm.host_id).update(published_port_min=23000, published_port_max=23000)
    publish(vm, alice)
    finish_all()
    with pytest.raises(Refused, match="Host h1 has no free port to publish on"):
        publish(vm, alice, port=443)


def test_the_published_range_must_stay_apart_from_the_ssh_range(vm):
    with pytest.raises(IntegrityError), transaction.atomic():
        Host.objects.filter(pk=vm.host_id).update(
            published_port_min=22500, published_port_max=23500
        )


# --- quota, forbidden ports, input -----------------------------------------------------


def test_the_groups_quota_counts_every_vm_and_refuses_past_it(vm, alice, group_a, make_vm):
    group_a.course.published_ports_per_group = 2
    group_a.course.save()
    second_vm = make_vm(group_a, name="vm2", ssh_port=22002)
    publish(vm, alice, 80)
    finish_all()
    publish(second_vm, alice, 80)
    finish_all()
    with pytest.raises(OverQuota, match="Your group publishes 2 ports, the most this course"):
        publish(vm, alice, 443)
    assert Publication.objects.count() == 2
    assert ports.quota_left(group=group_a) == 0


@pytest.mark.parametrize("port", [25, 22])
def test_a_forbidden_guest_port_is_refused_naming_it(vm, alice, port):
    with pytest.raises(Refused, match=f"Guest port {port} may not be published"):
        publish(vm, alice, port)
    assert not Publication.objects.exists()
    assert not Operation.objects.exists()


def test_ssh_stays_forbidden_when_the_course_lists_nothing(vm, alice, group_a):
    group_a.course.forbidden_guest_ports = ""
    group_a.course.save()
    publish(vm, alice, 25)
    finish_all()
    with pytest.raises(Refused, match="Guest port 22 may not be published.*SSH"):
        publish(vm, alice, 22)


@pytest.mark.parametrize("value", ["", "http", "0", "65536", "-1", "8.5", None])
def test_a_guest_port_that_is_no_port_is_invalid(vm, alice, value):
    with pytest.raises(Invalid, match="A guest port is a whole number from 1 to 65535"):
        ports.port_publish_request(vm=vm, guest_port=value, by=alice)


def test_a_guest_port_is_published_once_per_vm(vm, alice):
    publish(vm, alice)
    finish_all()
    with pytest.raises(Refused, match="Port 80 of vm1 is published already"):
        publish(vm, alice)


def test_another_group_and_a_suspended_or_busy_vm_are_refused(vm, alice, carol, bob):
    with pytest.raises(NotAllowed):
        publish(vm, carol)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SAVED)
    with pytest.raises(Refused, match="vm1 is suspended to disk"):
        publish(vm, alice)
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.RUNNING)
    requests.vm_operation_request(vm=vm, kind=OperationKind.REBOOT, by=alice)
    with pytest.raises(Busy, match="vm1 is busy"):
        publish(vm, bob)
    assert not Publication.objects.exists()  # nothing half-done


def test_a_bridged_host_publishes_nothing(vm, alice):
    Host.objects.filter(pk=vm.host_id).update(network_mode="bridge", bridge="br0")
    with pytest.raises(Refused, match="bridged network"):
        publish(vm, alice)


# --- the operations --------------------------------------------------------------------


def test_publish_forwards_every_port_of_the_vm_and_marks_it_published(vm, alice, driver):
    pub = publish(vm, alice)
    op = run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    assert op.status == OperationStatus.SUCCEEDED, op.error
    assert driver.calls == [(vm.domain_name, 22000, (PortSpec(23000, 80),))]
    pub.refresh_from_db()
    assert pub.state == PortState.PUBLISHED
    assert op.params["timings"]["publish_s"] == 0.01


def test_a_port_the_host_refuses_is_undone_and_freed(vm, alice, driver):
    driver.refuse = "could not forward port 23000: address in use"
    publish(vm, alice)
    op = run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    assert op.status == OperationStatus.FAILED
    assert "address in use" in op.error
    assert not Publication.objects.exists()
    assert driver.calls[-1] == (vm.domain_name, 22000, ())  # the definition as it was


def test_unpublish_takes_the_forward_out_and_frees_the_host_port(vm, alice, bob, driver):
    pub = publish(vm, alice)
    run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    op = ports.port_unpublish_request(publication=pub, by=bob)
    assert Publication.objects.get(pk=pub.pk).state == PortState.CLOSING
    assert run(op).status == OperationStatus.SUCCEEDED, op.error
    assert driver.calls[-1] == (vm.domain_name, 22000, ())
    assert not Publication.objects.exists()
    assert publish(vm, alice, 443).host_port == 23000  # free again


def test_a_stopped_vm_publishes_for_its_next_start_and_its_spec_carries_the_ports(
    vm, alice, driver
):
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    publish(vm, alice)
    run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    vm = Vm.objects.select_related("host", "group__course", "image").get(pk=vm.pk)
    assert executors.vm_spec(vm).ports == (PortSpec(23000, 80),)


def test_the_page_shows_a_publication_closed_while_its_vm_does_not_run(vm, alice, driver):
    pub = publish(vm, alice)
    run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    pub = Publication.objects.select_related("vm", "host").get(pk=pub.pk)
    assert pub.is_open and pub.url == "http://127.0.0.1:23000/"
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    pub = Publication.objects.select_related("vm", "host").get(pk=pub.pk)
    assert not pub.is_open


def test_deleting_the_vm_frees_its_ports(vm, alice, driver, monkeypatch):
    monkeypatch.setattr(executors, "vm_consoles_close", lambda vm, why: None)
    publish(vm, alice)
    run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    op = requests.vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice)
    assert run(op).status == OperationStatus.SUCCEEDED, op.error
    assert not Publication.objects.exists()


def test_a_move_gives_the_ports_ports_of_the_destination(vm, alice, ines, monkeypatch, driver):
    publish(vm, alice)
    run(Operation.objects.get(kind=OperationKind.PORT_PUBLISH))
    Vm.objects.filter(pk=vm.pk).update(observed_state=ObservedState.SHUTOFF)
    there = Host.objects.create(
        name="h2",
        uri="qemu:///system",
        vcpus=8,
        memory_mib=16384,
        disk_gib=200,
        ssh_port_min=30000,
        ssh_port_max=30009,
        published_port_min=31000,
        published_port_max=31009,
    )
    op = moves.vm_move_request(vm=vm, to=there, by=ines)
    pub = Publication.objects.get()
    assert op.params["ports"] == {str(pub.pk): 31000}

    asked = {}

    class Host2:
        def __init__(self, name):
            self.name = name

        def resolve_virt_type(self, requested):
            return "qemu"

        def copy_offline(self, to, *, source, target, seed_iso, progress):
            asked["source"], asked["target"] = source.ports, target.ports
            return {"total_s": 1.0}

        def delete(self, spec):
            pass

    fakes = {"h1": Host2("h1"), "h2": Host2("h2")}
    monkeypatch.setattr(moves, "driver_for", lambda host: fakes[host.name])
    assert run(op).status == OperationStatus.SUCCEEDED, op.error
    assert asked == {"source": (PortSpec(23000, 80),), "target": (PortSpec(31000, 80),)}
    pub.refresh_from_db()
    assert (pub.host, pub.host_port) == (there, 31000)


def test_publishing_counts_against_the_groups_rate_like_every_operation(vm, alice, settings):
    settings.OPERATIONS_PER_GROUP_PER_MINUTE = 1
    pub = publish(vm, alice)
    finish_all()
    with pytest.raises(Refused, match="Your group asked for 1 operations in the last minute"):
        ports.port_unpublish_request(publication=pub, by=alice)
    assert Publication.objects.get().state == PortState.OPENING  # nothing half-done
