"""The course staff's overview and its bulk form, for the whole cast.

Course staff (instructor, TA, superuser) see every group, VM, host and operation of the
course and act on many VMs at once; everyone else gets a 404, anonymous the sign-in page.
"""

import re
import zoneinfo
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from labs.choices import GroupStatus, ObservedState, OperationStatus, Role
from labs.models import Group, Host, Membership, Operation, Vm

pytestmark = pytest.mark.django_db

OVERVIEW = "labs:course_overview"
BULK = "labs:course_bulk"


@pytest.fixture
def lab(group_a, group_b, make_vm):
    """Alpha: vm1 running, vm2 stopped. Bravo: vm1 running whose last start failed."""
    a1 = make_vm(group_a, name="vm1")
    a2 = make_vm(group_a, name="vm2", observed_state=ObservedState.SHUTOFF, vcpus=2)
    b1 = make_vm(group_b, name="vm1")
    failed = Operation.objects.create(
        vm=b1, kind="start", status=OperationStatus.FAILED, error="Domain failed to boot"
    )
    Operation.objects.filter(pk=failed.pk).update(created_at=timezone.now() - timedelta(days=2))
    Operation.objects.create(vm=a1, kind="reboot", status=OperationStatus.SUCCEEDED)
    return a1, a2, b1


@pytest.fixture
def tom(make_student):
    return make_student("tom", role=Role.TA)


def overview_url(course):
    return reverse(OVERVIEW, args=[course.slug])


def bulk_url(course):
    return reverse(BULK, args=[course.slug])


def section(page: str, heading_id: str) -> str:
    """The HTML of one card, from its heading to the end of its section."""
    start = page.index(f'id="{heading_id}"')
    return page[start : page.index("</section>", start)]


def ops():
    return sorted(Operation.objects.values_list("vm__group__name", "vm__name", "kind", "status"))


# --- what course staff see ------------------------------------------------------------------


@pytest.mark.parametrize("who", ["ines", "tom"])
def test_course_staff_see_counts_groups_and_every_vm(request, who, client_for, course, lab):
    page = client_for(request.getfixturevalue(who)).get(overview_url(course)).content.decode()
    assert "<strong>0</strong> pending review" in page
    assert "<strong>2</strong> approved" in page
    assert "<strong>2</strong> running" in page and "<strong>1</strong> stopped" in page
    groups = section(page, "groups-heading")
    assert "Alpha" in groups and "Bravo" in groups
    assert "alice, bob" in groups and "carol" in groups
    assert "Reboot: succeeded" in groups and "Start: failed" in groups


def test_each_group_links_to_its_page_and_each_running_vm_to_its_console(
    client_for, ines, course, lab, group_a, group_b
):
    a1, a2, b1 = lab
    groups = section(client_for(ines).get(overview_url(course)).content.decode(), "groups-heading")
    for group in (group_a, group_b):
        assert f'href="{reverse("labs:group_detail", args=[group.pk])}"' in groups
    for vm in (a1, b1):
        console = reverse("labs:vm_console", args=[vm.pk])
        assert f'href="{console}"' in groups and f'href="{console}?mode=view"' in groups
    assert reverse("labs:vm_console", args=[a2.pk]) not in groups  # stopped: no console


def test_host_capacity_shows_what_live_vms_use_against_the_overcommitted_size(
    client_for, ines, course, lab, make_vm, group_a
):
    make_vm(group_a, name="gone", desired_state="deleted", observed_state="deleted", vcpus=8)
    spec = {"uri": "qemu:///system", "vcpus": 4, "memory_mib": 8192, "disk_gib": 100}
    Host.objects.create(name="idle-off", enabled=False, **spec)
    Host.objects.create(name="idle-on", **spec)
    draining = Host.objects.create(name="draining", enabled=False, **spec)
    make_vm(group_a, name="vm9", host=draining)
    hosts = section(client_for(ines).get(overview_url(course)).content.decode(), "hosts-heading")
    # h1: 8 vCPUs x4, 16384 MiB x1, 200 GiB x2; three live VMs: 1+2+1 vCPUs, 3x1024, 3x10.
    row = re.search(r"<th scope=\"row\">h1</th>(.*?)</tr>", hosts, re.S).group(1)
    assert "4 of 32" in row and "(28 free)" in row
    assert "3072 of 16384" in row and "(13312 free)" in row
    assert "30 of 400" in row and "(370 free)" in row
    assert '<td class="host-vms">3: ' in row  # VMs of this course
    row = re.search(r"<th scope=\"row\">draining</th>(.*?)</tr>", hosts, re.S).group(1)
    assert "1 of 16" in row and "disabled" in row
    assert "idle-on" in hosts  # enabled: new VMs may land there
    assert "idle-off" not in hosts  # disabled and holding nothing of the course


def test_each_host_shows_its_state_next_to_its_capacity(client_for, ines, course, lab):
    spec = {"uri": "qemu:///system", "vcpus": 4, "memory_mib": 8192, "disk_gib": 100}
    Host.objects.create(name="hv-drain", draining=True, **spec)
    since = timezone.localtime().replace(hour=14, minute=3, second=0, microsecond=0)
    Host.objects.create(
        name="hv-gone", unreachable_since=since, last_error="host hv-gone did not answer", **spec
    )
    hosts = section(client_for(ines).get(overview_url(course)).content.decode(), "hosts-heading")

    def row(name: str) -> str:
        return re.search(rf'<th scope="row">{name}</th>(.*?)</tr>', hosts, re.S).group(1)

    assert ">up</span>" in row("h1") and "16384" in row("h1")
    assert ">draining</span>" in row("hv-drain") and "8192" in row("hv-drain")
    assert ">unreachable since 14:03</span>" in row("hv-gone")
    assert "did not answer" in row("hv-gone")


def text_of(html: str) -> str:
    """What a reader sees of some HTML: the text, its white space collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split()).replace(" ,", ",").replace(" :", ":")


def host_row(page: str, name: str) -> str:
    hosts = section(page, "hosts-heading")
    return re.search(rf'<th scope="row">{name}</th>(.*?)</tr>', hosts, re.S).group(1)


def vm_item(page: str, group: str, vm: str) -> str:
    """The text of one VM's line in the Groups table."""
    groups = section(page, "groups-heading")
    row = re.search(rf'<th scope="row"><a [^>]*>{group}</a></th>(.*?)</tr>', groups, re.S)
    items = re.findall(r"<li>(.*?)</li>", row.group(1), re.S)
    return next(text_of(i) for i in items if text_of(i).startswith(f"{vm} "))


def test_each_host_names_the_courses_vms_on_it_linked_to_their_group(
    client_for, ines, course, lab, make_vm, make_group, make_student, other_course, group_a
):
    a1, a2, b1 = lab
    spec = {"uri": "qemu:///system", "vcpus": 4, "memory_mib": 8192, "disk_gib": 100}
    h2 = Host.objects.create(name="h2", **spec)
    a3 = make_vm(group_a, name="vm3", host=h2)
    oscar = make_student("oscar", in_course=other_course)
    make_vm(make_group(course=other_course, by=oscar, name="Omega"), name="theirs")
    page = client_for(ines).get(overview_url(course)).content.decode()

    assert "3: Alpha/vm1, Alpha/vm2, Bravo/vm1" in text_of(host_row(page, "h1"))
    assert "1: Alpha/vm3" in text_of(host_row(page, "h2"))
    for vm in (a1, a2, b1, a3):
        assert f'href="{reverse("labs:group_detail", args=[vm.group_id])}#vm-{vm.pk}"' in page
    assert "Omega" not in page and "theirs" not in page  # another course's VM on h1


def test_a_host_with_many_vms_names_six_and_counts_the_rest(
    client_for, ines, course, lab, make_vm, group_a
):
    for n in range(3, 8):
        make_vm(group_a, name=f"vm{n}")
    row = text_of(host_row(client_for(ines).get(overview_url(course)).content.decode(), "h1"))
    assert "8: Alpha/vm1, Alpha/vm2, Alpha/vm3, Alpha/vm4, Alpha/vm5, Alpha/vm6 and 2 more" in row
    assert "Alpha/vm7" not in row and "Bravo/vm1" not in row


def test_each_vm_of_the_groups_table_names_its_host(
    client_for, ines, course, lab, make_vm, group_a
):
    make_vm(group_a, name="vm3", host=None, observed_state=ObservedState.NEW)
    page = client_for(ines).get(overview_url(course)).content.decode()
    assert "on h1" in vm_item(page, "Alpha", "vm1")
    assert "on h1" in vm_item(page, "Bravo", "vm1")
    assert "no host yet" in vm_item(page, "Alpha", "vm3")


def test_a_vm_whose_host_did_not_answer_is_unknown_since_the_host_stopped_answering(
    client_for, ines, course, lab, settings
):
    a1, _, _ = lab
    settings.TIME_ZONE = "Asia/Tokyo"  # the page's time zone, not the database's UTC
    now = timezone.now().astimezone(zoneinfo.ZoneInfo("Asia/Tokyo"))
    stopped_answering = now.replace(hour=14, minute=3, second=0, microsecond=0)
    Host.objects.filter(pk=a1.host_id).update(unreachable_since=stopped_answering)
    # Reconcile marks the VMs unknown again on every pass that fails.
    Vm.objects.filter(pk=a1.pk).update(
        observed_state=ObservedState.UNKNOWN,
        observed_at=stopped_answering + timedelta(minutes=27),
    )
    page = client_for(ines).get(overview_url(course)).content.decode()
    item = vm_item(page, "Alpha", "vm1")
    assert item.startswith("vm1 Unknown (host did not answer) since ")
    assert "14:03 on h1" in item and "14:30" not in item
    assert "<strong>1</strong> unknown (host did not answer)" in page
    assert "since" not in vm_item(page, "Alpha", "vm2")  # stopped, and known


def test_an_operation_waiting_to_retry_shows_why(client_for, ines, course, lab):
    a1, _, _ = lab
    Operation.objects.create(
        vm=a1,
        kind="stop",
        status=OperationStatus.QUEUED,
        progress="waiting to retry",
        error="cannot connect to h1 — the host did not answer",
        attempts=1,
    )
    page = client_for(ines).get(overview_url(course)).content.decode()
    assert (
        "Shut down: queued — waiting to retry: cannot connect to h1 — the host did not answer"
        in vm_item(page, "Alpha", "vm1")
    )
    assert "Queued — waiting to retry: cannot connect to h1 — the host did not answer" in text_of(
        section(page, "operations-heading")
    )


def test_failed_operations_come_first_with_their_error(client_for, ines, course, lab):
    operations = section(
        client_for(ines).get(overview_url(course)).content.decode(), "operations-heading"
    )
    assert "Domain failed to boot" in operations
    assert operations.index("Domain failed to boot") < operations.index("Reboot")


def test_a_failure_put_right_by_a_later_success_falls_back_into_line(
    client_for, ines, course, lab
):
    _, _, b1 = lab
    start = Operation.objects.create(vm=b1, kind="start", status=OperationStatus.SUCCEEDED)
    Operation.objects.filter(pk=start.pk).update(created_at=timezone.now() - timedelta(days=1))
    operations = section(
        client_for(ines).get(overview_url(course)).content.decode(), "operations-heading"
    )
    # Newest first now: the reboot (today), the start that worked (yesterday), the failure.
    assert operations.index("Reboot") < operations.index("Domain failed to boot")


def test_hostile_group_names_and_errors_stay_escaped(
    client_for, ines, course, dave, make_group, make_vm
):
    group = make_group(course=course, by=dave, name="<script>alert(1)</script>")
    vm = make_vm(group, observed_state=ObservedState.SHUTOFF)
    Operation.objects.create(
        vm=vm, kind="start", status="failed", error="<img src=x onerror=alert(1)>"
    )
    client = client_for(ines)
    page = client.get(overview_url(course)).content.decode()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page

    # The name comes back in the bulk form's message too.
    response = client.post(bulk_url(course), {"kind": "stop", "scope": "all"}, follow=True)
    text = response.content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/vm1 is stopped" in text
    assert "<script>alert" not in text


def test_the_home_page_links_course_staff_to_the_overview(client_for, ines, alice, course):
    assert overview_url(course) in client_for(ines).get(reverse("labs:home")).content.decode()
    assert overview_url(course) not in client_for(alice).get(reverse("labs:home")).content.decode()


def test_a_superuser_off_the_roster_sees_it(client_for, course, lab):
    root = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    assert client_for(root).get(overview_url(course)).status_code == 200


# --- who may not ------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "carol", "dave", "olga"])
def test_students_and_staff_of_another_course_get_a_404(request, who, client_for, course, lab):
    client = client_for(request.getfixturevalue(who))
    assert client.get(overview_url(course)).status_code == 404
    response = client.post(bulk_url(course), {"kind": "stop", "scope": "all"})
    assert response.status_code == 404
    assert ops() == [
        ("Alpha", "vm1", "reboot", "succeeded"),
        ("Bravo", "vm1", "start", "failed"),
    ]


def test_an_unknown_course_is_a_404_even_for_staff(client_for, ines, course):
    assert client_for(ines).get(reverse(OVERVIEW, args=["nope"])).status_code == 404


def test_staff_of_another_course_cannot_reach_this_one_through_theirs(
    client_for, olga, other_course, course, lab
):
    """Olga's own overview never lists, and her bulk form never reaches, this course."""
    client = client_for(olga)
    page = client.get(overview_url(other_course)).content.decode()
    assert "Alpha" not in page and "Bravo" not in page
    group_a = Group.objects.get(name="Alpha")
    response = client.post(
        bulk_url(other_course), {"kind": "stop", "scope": "selected", "groups": [group_a.pk]}
    )
    assert response.status_code == 400
    assert not Operation.objects.filter(kind="stop").exists()


def test_anonymous_is_sent_to_sign_in(client, course, lab):
    for response in (
        client.get(overview_url(course)),
        client.post(bulk_url(course), {"kind": "stop", "scope": "all"}),
    ):
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert not Operation.objects.filter(kind="stop").exists()


# --- the bulk form ------------------------------------------------------------------------------


def test_the_instructor_shuts_down_the_selected_groups_vms(client_for, ines, course, lab, group_a):
    response = client_for(ines).post(
        bulk_url(course),
        {"kind": "stop", "scope": "selected", "groups": [group_a.pk]},
        follow=True,
    )
    assert response.redirect_chain[-1][0] == overview_url(course)
    page = response.content.decode()
    assert "Queued 1 operation; skipped 1: Alpha/vm2 is stopped." in page
    assert ("Alpha", "vm1", "stop", "queued") in ops()
    assert not Operation.objects.filter(vm__group__name="Bravo", kind="stop").exists()
    operations = section(page, "operations-heading")
    assert "Shut down" in operations and "Queued" in operations


def test_a_live_refresh_of_the_overview_leaves_the_message_for_the_next_page_load(
    client_for, ines, course, lab, group_a
):
    client = client_for(ines)
    client.post(bulk_url(course), {"kind": "stop", "scope": "selected", "groups": [group_a.pk]})
    message = "Queued 1 operation"
    refreshed = client.get(overview_url(course), headers={"X-Live-Refresh": "1"})
    assert message in refreshed.content.decode()  # rendered, but not used up
    assert message in client.get(overview_url(course)).content.decode()
    assert message not in client.get(overview_url(course)).content.decode()


def test_all_groups_reaches_every_approved_group(client_for, tom, course, lab):
    client_for(tom).post(bulk_url(course), {"kind": "stop", "scope": "all"})
    stops = Operation.objects.filter(kind="stop")
    assert sorted(stops.values_list("vm__group__name", "requested_by__username")) == [
        ("Alpha", "tom"),
        ("Bravo", "tom"),
    ]


def test_reset_without_the_confirmation_is_refused(client_for, ines, course, lab, group_a):
    client = client_for(ines)
    response = client.post(bulk_url(course), {"kind": "reset", "scope": "all"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "Nothing was queued" in page and "tick the box to confirm" in page
    assert not Operation.objects.filter(kind="reset").exists()

    client.post(bulk_url(course), {"kind": "reset", "scope": "all", "confirm_reset": "on"})
    assert Operation.objects.filter(kind="reset").count() == 3


def test_a_refused_form_keeps_the_selection(client_for, ines, course, lab, group_a, group_b):
    response = client_for(ines).post(
        bulk_url(course), {"kind": "reset", "scope": "selected", "groups": [group_b.pk]}
    )
    page = response.content.decode()
    assert f'value="{group_b.pk}" checked' in page
    assert f'value="{group_a.pk}" checked' not in page
    assert 'value="reset" required checked' in page


def test_selected_with_no_group_ticked_is_refused(client_for, ines, course, lab):
    response = client_for(ines).post(bulk_url(course), {"kind": "stop", "scope": "selected"})
    assert response.status_code == 400
    assert "Select at least one group" in response.content.decode()
    assert not Operation.objects.filter(kind="stop").exists()


def test_a_group_of_another_course_in_the_form_is_refused_whole(
    client_for, ines, course, other_course, lab, group_a, make_student, make_group, make_vm
):
    erin = make_student("erin", in_course=other_course)
    echo = make_group(course=other_course, by=erin, name="Echo")
    make_vm(echo)
    response = client_for(ines).post(
        bulk_url(course), {"kind": "stop", "scope": "selected", "groups": [group_a.pk, echo.pk]}
    )
    assert response.status_code == 400
    assert not Operation.objects.filter(kind="stop").exists()


def test_the_bulk_form_needs_a_post(client_for, ines, course, lab):
    assert client_for(ines).get(bulk_url(course)).status_code == 405


def test_the_bulk_form_needs_the_csrf_token(ines, course, lab):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ines)
    data = {"kind": "stop", "scope": "all"}
    assert client.post(bulk_url(course), data).status_code == 403
    assert not Operation.objects.filter(kind="stop").exists()

    page = client.get(overview_url(course)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    assert client.post(bulk_url(course), {**data, "csrfmiddlewaretoken": token}).status_code == 302
    assert Operation.objects.filter(kind="stop").count() == 2


# --- cost ----------------------------------------------------------------------------------------


def add_groups(course, n, *, start=0):
    """n approved groups, each with two members, two VMs (one busy, one on a host of its
    own) and five operations."""
    host = Host.objects.get(name="h1")
    image = host.vms.first().image
    users = get_user_model()
    for i in range(start, start + n):
        group = Group.objects.create(
            course=course,
            name=f"G{i:03d}",
            project_title="p",
            project_idea="p",
            ssh_public_key="k",
            ssh_key_type="ssh-ed25519",
            ssh_key_bits=256,
            ssh_key_fingerprint=f"SHA256:{i}",
            status=GroupStatus.APPROVED,
        )
        spare = Host.objects.create(
            name=f"spare{i}", uri="qemu:///system", vcpus=8, memory_mib=8192, disk_gib=100
        )
        for m in range(2):
            user = users.objects.create_user(f"u{i}m{m}", password=None)
            Membership.objects.create(course=course, user=user, group=group)
        for v, on in enumerate((host, spare)):
            vm = group.vms.create(
                name=f"vm{v}", host=on, image=image, vcpus=1, memory_mib=512, disk_gib=5
            )
            Operation.objects.create(vm=vm, kind="start", status=OperationStatus.FAILED, error="e")
            Operation.objects.create(vm=vm, kind="reboot", status=OperationStatus.SUCCEEDED)
        Operation.objects.create(vm=vm, kind="stop", status=OperationStatus.RUNNING)


def test_the_overview_costs_the_same_queries_for_1_and_for_20_groups(
    client_for, ines, course, group_a, make_vm
):
    make_vm(group_a)
    client = client_for(ines)
    client.get(overview_url(course))  # warm the session

    def count() -> tuple[int, str]:
        with CaptureQueriesContext(connection) as captured:
            page = client.get(overview_url(course)).content.decode()
        return len(captured), page

    add_groups(course, 1)
    few, page = count()
    assert "G000" in page
    add_groups(course, 19, start=1)
    many, page = count()
    assert "G019" in page and "spare19" in page and "G019/vm1" in page
    assert many == few, f"{few} queries for 2 groups, {many} for 21"
    # 10, the Usage section's 5 (usage.course_report), the final snapshots' 1 (term),
    # the bulk form's groups 1.
    assert few <= 17
    # Nothing changed since: every part comes from the page cache (labs/live/pagecache.py),
    # and the page reads the same.
    again, same = count()
    assert again <= 4, f"{again} queries for a page whose parts are cached"
    assert _without_live_at(same) == _without_live_at(page)


def _without_live_at(page: str) -> str:
    """The page but for its time and its CSRF tokens (masked anew for every page)."""
    page = re.sub(r'data-live-at="[0-9.]+"', "", page)
    return re.sub(r'(content|value)="[A-Za-z0-9]{64}"', "", page)


def test_host_usages_agree_with_placement_and_take_one_query(
    course, group_a, group_b, make_vm, django_assert_num_queries
):
    from labs.compute.placement import host_usage
    from labs.selectors import host_usages

    make_vm(group_a, name="vm1", vcpus=2, memory_mib=2048)
    make_vm(group_a, name="vm2", desired_state="deleted", observed_state="deleted")
    other = Host.objects.create(
        name="h2", uri="qemu:///system", vcpus=2, memory_mib=4096, disk_gib=50, enabled=False
    )
    make_vm(group_b, name="vm1", host=other, desired_state="stopped")
    Host.objects.create(name="h3", uri="qemu:///system", vcpus=1, memory_mib=1, disk_gib=1)

    with django_assert_num_queries(1):
        usages = host_usages()
    assert [u.host.name for u in usages] == ["h1", "h2", "h3"]
    for usage in usages:
        expected = host_usage(host=usage.host)  # what placement decides with
        assert (usage.vcpus, usage.memory_mib, usage.disk_gib) == (
            expected.vcpus,
            expected.memory_mib,
            expected.disk_gib,
        )
    assert [u.course_vms for u in host_usages(course=course)] == [1, 1, 0]
