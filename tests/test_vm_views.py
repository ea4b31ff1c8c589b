"""VM pages and operation endpoints for the cast; another group's VM is a 404 everywhere."""

import re
import zoneinfo
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from labs.models import Host, Image, Operation, Vm, VmTemplate

pytestmark = pytest.mark.django_db


@pytest.fixture
def approved(group_a, group_b, course, make_vm):
    vm_a = make_vm(group_a, ssh_port=22000)
    vm_b = make_vm(group_b, ssh_port=22001)
    Host.objects.filter(pk=vm_a.host_id).update(ssh_address="lab.example.edu")
    Image.objects.filter(pk=vm_a.image_id).update(login_user="student")
    VmTemplate.objects.create(course=course, image=vm_a.image, quota_vms=2)
    return vm_a, vm_b


def op_url(vm, kind):
    return reverse("labs:vm_operation", args=[vm.pk, kind])


def test_members_see_their_vm_state_and_exact_ssh_line(client_for, alice, bob, approved, group_a):
    vm_a, _ = approved
    for user in (alice, bob):
        page = client_for(user).get(reverse("labs:group_detail", args=[group_a.pk])).content
        text = page.decode()
        assert "ssh -p 22000 student@lab.example.edu" in text
        assert "Running" in text and "Take snapshot" in text


def test_the_group_page_never_shows_another_groups_vm(client_for, alice, approved, group_a):
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content
    assert b"22001" not in page


@pytest.mark.parametrize("kind", ["reboot", "stop", "force_off", "snapshot", "reset", "delete"])
def test_a_member_queues_an_operation_with_a_post(client_for, bob, approved, kind):
    vm_a, _ = approved
    response = client_for(bob).post(op_url(vm_a, kind), {"name": "s1"}, follow=True)
    op = Operation.objects.get(vm=vm_a)
    assert (op.kind, op.status, op.requested_by) == (kind, "queued", bob)
    assert "is queued" in response.content.decode()


def test_operations_need_a_post(client_for, alice, approved):
    vm_a, _ = approved
    assert client_for(alice).get(op_url(vm_a, "reboot")).status_code == 405
    assert not Operation.objects.exists()


def test_operations_need_the_csrf_token(alice, approved):
    from django.test import Client

    vm_a, _ = approved
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(op_url(vm_a, "reboot")).status_code == 403
    assert not Operation.objects.exists()


@pytest.mark.parametrize("kind", ["reboot", "delete", "snapshot"])
def test_another_groups_vm_is_a_404_on_every_endpoint(client_for, carol, approved, kind):
    vm_a, _ = approved
    assert client_for(carol).post(op_url(vm_a, kind)).status_code == 404
    assert not Operation.objects.exists()


def test_a_student_in_no_group_gets_a_404(client_for, dave, approved):
    vm_a, _ = approved
    assert client_for(dave).post(op_url(vm_a, "reboot")).status_code == 404


def test_anonymous_is_sent_to_sign_in(client, approved):
    vm_a, _ = approved
    response = client.post(op_url(vm_a, "reboot"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert not Operation.objects.exists()


def test_the_instructor_can_operate_any_vm_of_the_course(client_for, ines, approved):
    vm_a, _ = approved
    client_for(ines).post(op_url(vm_a, "reboot"))
    assert Operation.objects.get(vm=vm_a).requested_by == ines


def test_unknown_operations_and_provision_are_404(client_for, alice, approved):
    vm_a, _ = approved
    client = client_for(alice)
    assert client.post(op_url(vm_a, "provision")).status_code == 404
    assert client.post(op_url(vm_a, "format-c")).status_code == 404


def test_a_refused_operation_is_explained(client_for, alice, approved):
    vm_a, _ = approved
    response = client_for(alice).post(op_url(vm_a, "start"), follow=True)
    assert "already running" in response.content.decode()
    assert not Operation.objects.exists()


def test_a_deleted_vm_is_gone_from_pages_and_endpoints(client_for, alice, approved, group_a):
    vm_a, _ = approved
    Vm.objects.filter(pk=vm_a.pk).update(desired_state="deleted", observed_state="deleted")
    client = client_for(alice)
    page = client.get(reverse("labs:group_detail", args=[group_a.pk])).content
    assert b"22000" not in page
    assert client.post(op_url(vm_a, "reboot")).status_code == 404


def test_add_vm_is_scoped_to_members(client_for, carol, approved, group_a):
    response = client_for(carol).post(reverse("labs:vm_add", args=[group_a.pk]))
    assert response.status_code == 404
    assert Vm.objects.filter(group=group_a).count() == 1


def test_hostile_snapshot_and_group_names_stay_escaped(client_for, alice, approved, group_a):
    vm_a, _ = approved
    Operation.objects.create(
        vm=vm_a,
        kind="snapshot",
        status="failed",
        params={"name": "<script>x</script>"},
        error="<img src=x onerror=alert(1)>",
    )
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content
    assert b"<script>x" not in page and b"<img src=x" not in page
    assert b"&lt;img src=x onerror=alert(1)&gt;" in page


# --- a host that does not answer --------------------------------------------------------------


def text_of(html: str) -> str:
    """What a reader sees of some HTML: the text, its white space collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split()).replace(" :", ":")


def vm_card(page: str, vm) -> str:
    start = page.index(f'<article class="vm" id="vm-{vm.pk}"')
    return page[start : page.index("</article>", start)]


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
def test_a_vm_whose_host_did_not_answer_shows_unknown_since_then(
    request, who, client_for, approved, group_a, settings
):
    vm_a, _ = approved
    settings.TIME_ZONE = "Asia/Tokyo"  # the page's time zone, not the database's UTC
    now = timezone.now().astimezone(zoneinfo.ZoneInfo("Asia/Tokyo"))
    stopped_answering = now.replace(hour=14, minute=3, second=0, microsecond=0)
    Host.objects.filter(pk=vm_a.host_id).update(unreachable_since=stopped_answering)
    Vm.objects.filter(pk=vm_a.pk).update(
        observed_state="unknown", observed_at=stopped_answering + timedelta(minutes=27)
    )
    client = client_for(request.getfixturevalue(who))
    page = client.get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    heading = text_of(re.search(r"<h3 [^>]*>(.*?)</h3>", vm_card(page, vm_a), re.S).group(1))
    assert heading.startswith("vm1 Unknown (host did not answer) since ")
    assert heading.endswith("14:03") and "14:30" not in heading


def test_a_vm_marked_unknown_before_its_host_says_since_when_it_was_marked(
    client_for, alice, approved, group_a
):
    vm_a, _ = approved  # an operation gave up on the host; reconcile has not been by yet
    marked = timezone.localtime().replace(hour=9, minute=41, second=0, microsecond=0)
    Vm.objects.filter(pk=vm_a.pk).update(observed_state="unknown", observed_at=marked)
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    assert "Unknown (host did not answer) since 09:41" in text_of(vm_card(page, vm_a))


def test_a_known_vm_says_no_since(client_for, alice, approved, group_a):
    vm_a, _ = approved
    Host.objects.filter(pk=vm_a.host_id).update(unreachable_since=timezone.now())
    page = client_for(alice).get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    assert "since" not in text_of(vm_card(page, vm_a))  # running, as last observed


@pytest.mark.parametrize("who", ["alice", "bob", "ines"])
def test_an_operation_waiting_to_retry_shows_why_on_the_group_page(
    request, who, client_for, approved, group_a
):
    vm_a, _ = approved
    Operation.objects.create(
        vm=vm_a,
        kind="reboot",
        status="queued",
        progress="waiting to retry",
        error="cannot connect to h1 — the host did not answer",
        attempts=1,
    )
    client = client_for(request.getfixturevalue(who))
    page = client.get(reverse("labs:group_detail", args=[group_a.pk])).content.decode()
    reason = "waiting to retry: cannot connect to h1 — the host did not answer"
    assert f"Reboot: queued — {reason}" in text_of(vm_card(page, vm_a))
    history = page[page.index('id="ops-heading"') :]
    assert f"Queued — {reason}" in text_of(history)
