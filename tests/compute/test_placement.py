"""Placement across hosts: host states, the course's policy (pack or spread) and a
group's VMs kept together.

Placement reads rows only; the reconcile tests at the end reach libvirt's test driver
(a host that answers) and a closed loopback port (a host that does not).
"""

from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from labs.choices import PlacementPolicy
from labs.compute import reconcile
from labs.compute.placement import vm_place
from labs.models import Course, Host, Image, Vm
from tests.compute.test_vms import make_host

pytestmark = pytest.mark.django_db

#: Where no libvirt answers (a closed port on the loopback).
NOWHERE = "qemu+tcp://127.0.0.1:1/system"


def at_1403_today() -> datetime:
    """14:03 today, local time: ``state_label`` says "unreachable since 14:03"."""
    return timezone.localtime().replace(hour=14, minute=3, second=0, microsecond=0)


@pytest.fixture
def image(db):
    return Image.objects.create(name="deb", os="Debian 12", path="/srv/base.qcow2")


@pytest.fixture
def place(image):
    """Make an unplaced VM row of the group (1 vCPU, 1024 MiB, 10 GiB unless told), place
    it, and return it as the database holds it afterwards."""

    def make(group, name: str, **resources) -> Vm:
        vm = Vm.objects.create(
            group=group,
            name=name,
            image=image,
            **{"vcpus": 1, "memory_mib": 1024, "disk_gib": 10, **resources},
        )
        vm_place(vm=vm)
        vm.refresh_from_db()
        return vm

    return make


def host_of(vm: Vm) -> str | None:
    return vm.host.name if vm.host else None


def policy(course: Course, value: str) -> None:
    Course.objects.filter(pk=course.pk).update(placement=value)


# --- the course's policy ------------------------------------------------------------------


def test_a_new_course_spreads(course):
    assert course.placement == PlacementPolicy.SPREAD


@pytest.mark.parametrize(
    ("chosen", "expected"), [(PlacementPolicy.SPREAD, "roomy"), (PlacementPolicy.PACK, "snug")]
)
def test_spread_takes_the_roomiest_host_and_pack_the_fullest_that_still_fits(
    chosen, expected, course, group_a, place, tmp_path
):
    make_host("roomy", tmp_path=tmp_path, memory_mib=8192)
    make_host("snug", tmp_path=tmp_path, memory_mib=2048)
    make_host("tiny", tmp_path=tmp_path, memory_mib=512)  # the fullest, but it does not fit
    policy(course, chosen)
    vm = place(group_a, "vm1")
    assert host_of(vm) == expected and vm.status_message == ""


@pytest.mark.parametrize(
    ("chosen", "expected"),
    [(PlacementPolicy.SPREAD, ["a", "b", "a", "b"]), (PlacementPolicy.PACK, ["a", "a", "b", "b"])],
)
def test_pack_fills_one_host_before_the_next_and_spread_takes_turns(
    chosen, expected, course, make_student, make_group, place, tmp_path
):
    make_host("a", tmp_path=tmp_path, memory_mib=2048)
    make_host("b", tmp_path=tmp_path, memory_mib=2048)
    policy(course, chosen)
    groups = [make_group(course=course, by=make_student(f"s{n}"), name=f"G{n}") for n in range(4)]
    assert [host_of(place(g, "vm1")) for g in groups] == expected


# --- a group's VMs together -----------------------------------------------------------------


def test_a_groups_vms_stay_on_the_host_where_its_first_one_went(group_a, group_b, place, tmp_path):
    make_host("a", tmp_path=tmp_path, memory_mib=4096)
    make_host("b", tmp_path=tmp_path, memory_mib=4096)
    first, second = place(group_a, "vm1"), place(group_a, "vm2")
    # Spread alone would have sent vm2 to b, the roomier host by then.
    assert (host_of(first), host_of(second)) == ("a", "a")
    assert second.status_message == ""
    # Another group is not drawn there: the policy places it.
    assert host_of(place(group_b, "vm1")) == "b"


def test_a_group_goes_where_most_of_its_vms_run(group_a, place, tmp_path):
    a = make_host("a", tmp_path=tmp_path, memory_mib=8192, vcpus=8)
    b = make_host("b", tmp_path=tmp_path, memory_mib=8192, vcpus=8)
    for name, host in (("vm1", a), ("vm2", b), ("vm3", b)):
        fields = {"vcpus": 1, "memory_mib": 1024, "disk_gib": 10}
        Vm.objects.create(group=group_a, name=name, image=Image.objects.get(), host=host, **fields)
    assert host_of(place(group_a, "vm4")) == "b"


def test_a_group_splits_when_its_host_is_full_and_the_vm_says_so(group_a, place, tmp_path):
    make_host("a", tmp_path=tmp_path, memory_mib=2048)
    make_host("b", tmp_path=tmp_path, memory_mib=1536)
    vms = [place(group_a, f"vm{n}") for n in (1, 2, 3)]
    assert [host_of(vm) for vm in vms] == ["a", "a", "b"]
    assert vms[2].status_message == "Placed on b: a, where the group's other VMs run, is full."


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"enabled": False}, "disabled"),
        ({"draining": True}, "draining"),
        ({"unreachable_since": at_1403_today()}, "unreachable since 14:03"),
    ],
)
def test_a_group_whose_host_is_not_up_goes_elsewhere_and_says_why(
    fields, why, group_a, place, tmp_path
):
    make_host("a", tmp_path=tmp_path)
    make_host("b", tmp_path=tmp_path)
    assert host_of(place(group_a, "vm1")) == "a"
    Host.objects.filter(name="a").update(**fields)
    vm = place(group_a, "vm2")
    assert host_of(vm) == "b"
    assert vm.status_message == f"Placed on b: a, where the group's other VMs run, is {why}."


# --- hosts that are not up ------------------------------------------------------------------


NOT_UP = [
    pytest.param({"enabled": False}, id="disabled"),
    pytest.param({"draining": True}, id="draining"),
    pytest.param({"unreachable_since": timezone.now() - timedelta(minutes=5)}, id="unreachable"),
]


@pytest.mark.parametrize("fields", NOT_UP)
@pytest.mark.parametrize("chosen", PlacementPolicy.values)
def test_a_host_that_is_not_up_is_never_chosen(fields, chosen, course, group_a, place, tmp_path):
    make_host("big", tmp_path=tmp_path, memory_mib=65536, **fields)  # what spread would take
    make_host("snug", tmp_path=tmp_path, memory_mib=1024, **fields)  # what pack would take
    make_host("ok", tmp_path=tmp_path, memory_mib=4096)
    policy(course, chosen)
    assert host_of(place(group_a, "vm1")) == "ok"


def test_a_host_that_answers_again_gets_vms_again(group_a, place, tmp_path):
    make_host("a", tmp_path=tmp_path, unreachable_since=timezone.now())
    assert host_of(place(group_a, "vm1")) is None
    Host.objects.update(unreachable_since=None)
    assert host_of(place(group_a, "vm2")) == "a"


@pytest.mark.parametrize(
    ("fields", "state", "label"),
    [
        ({}, "up", "up"),
        (
            {"enabled": False, "draining": True, "unreachable_since": at_1403_today()},
            *["disabled"] * 2,
        ),
        ({"draining": True, "unreachable_since": at_1403_today()}, *["draining"] * 2),
        ({"unreachable_since": at_1403_today()}, "unreachable", "unreachable since 14:03"),
        (
            {"unreachable_since": at_1403_today().replace(year=2025, month=3, day=5)},
            "unreachable",
            "unreachable since Mar 5, 14:03",
        ),
    ],
)
def test_a_hosts_state_is_the_first_that_applies(fields, state, label, tmp_path):
    host = make_host("hv1", tmp_path=tmp_path, **fields)
    host.refresh_from_db()
    assert (host.state, host.state_label) == (state, label)


# --- why a VM waits -------------------------------------------------------------------------


def test_the_waiting_message_names_each_host_that_is_not_up_and_why(group_a, place, tmp_path):
    make_host("hv1", tmp_path=tmp_path, draining=True)
    make_host("hv2", tmp_path=tmp_path, unreachable_since=at_1403_today())
    make_host("hv3", tmp_path=tmp_path, enabled=False)
    vm = place(group_a, "vm1")
    assert vm.host is None and vm.ssh_port is None
    assert vm.status_message == (
        "Waiting: no host is up (hv1 draining, hv2 unreachable since 14:03, hv3 disabled)."
    )


def test_when_hosts_are_up_but_full_the_waiting_message_says_so(group_a, place, tmp_path):
    make_host("hv1", tmp_path=tmp_path, memory_mib=512)
    make_host("hv2", tmp_path=tmp_path, draining=True)
    vm = place(group_a, "vm1")
    assert vm.host is None
    assert vm.status_message == "Waiting: no host has room for it right now (hv2 draining)."


def test_without_any_host_the_vm_waits_for_one_to_be_registered(group_a, place):
    vm = place(group_a, "vm1")
    assert vm.host is None and vm.status_message == "Waiting: no host is registered yet."


def test_a_long_list_of_hosts_down_is_cut_short(group_a, place, tmp_path):
    for n in range(7):
        make_host(f"hv{n}", tmp_path=tmp_path, draining=True)
    vm = place(group_a, "vm1")
    assert vm.status_message == (
        "Waiting: no host is up (hv0 draining, hv1 draining, hv2 draining, hv3 draining "
        "and 3 more)."
    )


# --- cost -----------------------------------------------------------------------------------


def test_placement_costs_the_same_queries_for_one_host_and_for_eight(
    course, make_student, make_group, image, group_a, tmp_path
):
    def queries(vm: Vm) -> int:
        with CaptureQueriesContext(connection) as captured:
            vm_place(vm=vm)
        return len(captured)

    def new_vm(name: str, group=group_a, **resources) -> Vm:
        fields = {"vcpus": 1, "memory_mib": 1024, "disk_gib": 10, **resources}
        return Vm.objects.create(group=group, name=name, image=image, **fields)

    make_host("h0", tmp_path=tmp_path, memory_mib=8192, vcpus=8)
    vm_place(vm=new_vm("vm0"))  # the group has a home
    few = queries(new_vm("vm1"))
    for n in range(1, 8):
        make_host(f"h{n}", tmp_path=tmp_path, memory_mib=8192, vcpus=8, draining=n % 2 == 0)
        other = make_group(course=course, by=make_student(f"s{n}"), name=f"G{n}")
        for m in range(2):
            vm_place(vm=new_vm(f"vm{m}", group=other, memory_mib=512))
    placed = new_vm("vm2")
    many = queries(placed)
    placed.refresh_from_db()
    assert placed.host.name == "h0"
    assert Vm.objects.filter(host__isnull=False).values("host").distinct().count() == 5
    assert many == few, f"{few} queries with one host, {many} with eight"
    waiting_few = queries(new_vm("big", memory_mib=100000))
    make_host("h8", tmp_path=tmp_path, enabled=False)
    assert queries(new_vm("bigger", memory_mib=100000)) == waiting_few


# --- reconcile records when a host stopped answering ---------------------------------------


def test_reconcile_marks_a_host_unreachable_from_the_first_pass_it_fails_until_it_answers(
    tmp_path,
):
    host = make_host("hv1", tmp_path=tmp_path)
    answering_uri = host.uri
    Host.objects.filter(pk=host.pk).update(uri=NOWHERE)
    host.refresh_from_db()

    assert not reconcile.host_reconcile(host=host).reachable
    host.refresh_from_db()
    first = host.unreachable_since
    assert first is not None and timezone.now() - first < timedelta(minutes=1)
    assert host.state == "unreachable" and "did not answer" in host.last_error

    Host.objects.filter(pk=host.pk).update(unreachable_since=first - timedelta(hours=1))
    reconcile.host_reconcile(host=host)  # still down: the first time stays
    host.refresh_from_db()
    assert host.unreachable_since == first - timedelta(hours=1)

    Host.objects.filter(pk=host.pk).update(uri=answering_uri)
    host.refresh_from_db()
    assert reconcile.host_reconcile(host=host).reachable
    host.refresh_from_db()
    assert host.unreachable_since is None and host.last_error == ""
    assert host.last_seen_at is not None and host.state == "up"


def test_after_reconcile_finds_a_host_unreachable_new_vms_go_elsewhere(group_a, place, tmp_path):
    roomy = make_host("roomy", tmp_path=tmp_path, memory_mib=8192)
    make_host("other", tmp_path=tmp_path, memory_mib=2048)
    Host.objects.filter(pk=roomy.pk).update(uri=NOWHERE)
    roomy.refresh_from_db()
    reconcile.host_reconcile(host=roomy)
    assert host_of(place(group_a, "vm1")) == "other"
