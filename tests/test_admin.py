"""The admin as the instructors' panel: scoping, bulk approve, reject with a note."""

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.core import mail
from django.urls import reverse

from labs.choices import GroupStatus, Role
from labs.models import Course, Group

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:labs_group_changelist"


def test_the_instructor_sees_the_courses_groups_with_members_in_the_list(
    client_for, ines, group_a, group_b
):
    page = client_for(ines).get(reverse(CHANGELIST)).content.decode()
    assert "Alpha" in page and "Bravo" in page
    assert "alice, bob" in page


def test_search_finds_a_group_by_member_username(client_for, ines, group_a, group_b):
    page = client_for(ines).get(reverse(CHANGELIST), {"q": "bob"}).content.decode()
    assert "Alpha" in page and "Bravo" not in page


def test_status_filter_narrows_the_list(client_for, ines, group_a, group_b):
    Group.objects.filter(pk=group_b.pk).update(status=GroupStatus.REJECTED)
    page = client_for(ines).get(reverse(CHANGELIST), {"status__exact": "pending"}).content.decode()
    assert "Alpha" in page and "Bravo" not in page


def test_the_change_page_shows_members_inline_and_the_key(client_for, ines, group_a):
    page = client_for(ines).get(reverse("admin:labs_group_change", args=[group_a.pk]))
    text = page.content.decode()
    assert page.status_code == 200
    assert "alice@example.edu" in text and group_a.ssh_key_fingerprint in text


def test_an_instructor_of_another_course_sees_none_of_these_groups(
    client_for, make_student, group_a
):
    other = Course.objects.create(slug="net", title="Networks")
    tom = make_student("tom", role=Role.INSTRUCTOR, in_course=other)
    client = client_for(tom)
    assert "Alpha" not in client.get(reverse(CHANGELIST)).content.decode()
    response = client.get(reverse("admin:labs_group_change", args=[group_a.pk]))
    assert response.status_code == 302  # the admin redirects a missing object to the list
    assert "Alpha" not in client.get(response["Location"]).content.decode()


def test_students_cannot_open_the_admin(client_for, alice, group_a):
    response = client_for(alice).get(reverse(CHANGELIST))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_bulk_approve_approves_and_emails_every_member(
    client_for, ines, group_a, group_b, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(ines).post(
            reverse(CHANGELIST),
            {"action": "approve", ACTION_CHECKBOX_NAME: [group_a.pk, group_b.pk]},
            follow=True,
        )
    assert "Approved 2 group(s)" in response.content.decode()
    assert set(Group.objects.values_list("status", flat=True)) == {GroupStatus.APPROVED}
    assert sorted(m.to[0] for m in mail.outbox) == [
        "alice@example.edu",
        "bob@example.edu",
        "carol@example.edu",
    ]
    group_a.refresh_from_db()
    assert group_a.reviewed_by == ines


def test_bulk_reject_asks_for_a_note_then_rejects_with_it(
    client_for, ines, group_a, group_b, django_capture_on_commit_callbacks
):
    client = client_for(ines)
    first = client.post(
        reverse(CHANGELIST), {"action": "reject", ACTION_CHECKBOX_NAME: [group_a.pk]}
    )
    assert first.status_code == 200 and "Reject and email the members" in first.content.decode()
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.PENDING
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse(CHANGELIST),
            {"action": "reject", ACTION_CHECKBOX_NAME: [group_a.pk], "note": "Too broad."},
        )
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.REJECTED and group_a.review_note == "Too broad."
    assert {m.to[0] for m in mail.outbox} == {"alice@example.edu", "bob@example.edu"}
    group_b.refresh_from_db()
    assert group_b.status == GroupStatus.PENDING


def test_course_staff_cannot_edit_group_fields_directly(client_for, ines, group_a):
    client = client_for(ines)
    client.post(
        reverse("admin:labs_group_change", args=[group_a.pk]),
        {
            "name": "Renamed",
            "project_title": "x",
            "project_idea": "y",
            "course": group_a.course_id,
        },
    )
    group_a.refresh_from_db()
    assert group_a.name == "Alpha"


def test_memberships_are_searchable_and_filtered_by_course_for_staff(
    client_for, ines, alice, dave
):
    client = client_for(ines)
    page = client.get(reverse("admin:labs_membership_changelist"), {"q": "dave"}).content.decode()
    assert "dave@example.edu" in page and "alice@example.edu" not in page


def test_a_superuser_sees_everything(client, group_a):
    admin = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    client.force_login(admin)
    assert "Alpha" in client.get(reverse(CHANGELIST)).content.decode()


# --- hosts, VMs, operations ---------------------------------------------------------------


@pytest.fixture
def vm_of_a(group_a, course, make_vm):
    from labs.models import VmTemplate

    vm = make_vm(
        group_a, ssh_port=22000, status_message="Waiting: no host has room for it right now."
    )
    VmTemplate.objects.create(course=course, image=vm.image)
    return vm


def test_the_instructor_sees_why_a_vm_waits(client_for, ines, vm_of_a):
    page = client_for(ines).get(reverse("admin:labs_vm_changelist")).content.decode()
    assert "Waiting: no host has room for it right now." in page


def test_another_courses_instructor_sees_none_of_its_vms(client_for, make_student, vm_of_a):
    other = Course.objects.create(slug="net", title="Networks")
    tom = make_student("tom", role=Role.INSTRUCTOR, in_course=other)
    page = client_for(tom).get(reverse("admin:labs_vm_changelist")).content.decode()
    assert "Waiting: no host" not in page


def test_hosts_and_images_stay_with_superusers(client_for, ines, vm_of_a):
    client = client_for(ines)
    assert client.get(reverse("admin:labs_host_changelist")).status_code == 403
    assert client.get(reverse("admin:labs_image_changelist")).status_code == 403


def test_a_superuser_sees_each_hosts_state_and_drains_one_from_the_list(client, vm_of_a):
    from django.utils import timezone

    from labs.models import Host

    root = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    client.force_login(root)
    since = timezone.localtime().replace(hour=14, minute=3, second=0, microsecond=0)
    spec = {"uri": "qemu:///system", "vcpus": 4, "memory_mib": 8192, "disk_gib": 100}
    gone = Host.objects.create(name="h2", unreachable_since=since, **spec)
    url = reverse("admin:labs_host_changelist")
    page = client.get(url).content.decode()
    assert '<td class="field-state">up</td>' in page
    assert '<td class="field-state">unreachable since 14:03</td>' in page

    h1 = vm_of_a.host
    form = {
        "form-TOTAL_FORMS": "2",
        "form-INITIAL_FORMS": "2",
        "form-0-id": str(h1.pk),
        "form-0-draining": "on",
        "form-1-id": str(gone.pk),
        "_save": "Save",
    }
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    h1.refresh_from_db()
    gone.refresh_from_db()
    assert (h1.draining, h1.state, gone.draining) == (True, "draining", False)
    assert '<td class="field-state">draining</td>' in client.get(url).content.decode()


@pytest.fixture
def root(client):
    user = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    client.force_login(user)
    return client


@pytest.fixture
def hosts_with_vms(vm_of_a, group_b, make_vm):
    """h1: Alpha/vm1, Bravo/vm1 and a deleted Bravo/old; h2: Bravo/vm2."""
    from labs.models import Host

    h1 = vm_of_a.host
    h2 = Host.objects.create(
        name="h2", uri="qemu:///system", vcpus=4, memory_mib=8192, disk_gib=100
    )
    make_vm(group_b, name="vm1")
    make_vm(group_b, name="old", desired_state="deleted", observed_state="deleted")
    make_vm(group_b, name="vm2", host=h2)
    return h1, h2


def vm_list_link(host) -> str:
    return f"{reverse('admin:labs_vm_changelist')}?host__id__exact={host.pk}&amp;deleted=no"


def test_the_hosts_list_counts_each_hosts_vms_and_links_to_them(root, hosts_with_vms):
    h1, h2 = hosts_with_vms
    page = root.get(reverse("admin:labs_host_changelist")).content.decode()
    assert f'<td class="field-vm_count"><a href="{vm_list_link(h1)}">2</a></td>' in page
    assert f'<td class="field-vm_count"><a href="{vm_list_link(h2)}">1</a></td>' in page

    listed = root.get(vm_list_link(h1).replace("&amp;", "&")).content.decode()
    assert "Alpha/vm1" in listed and "Bravo/vm1" in listed
    assert "Bravo/old" not in listed and "Bravo/vm2" not in listed


def test_the_hosts_list_costs_the_same_queries_for_2_and_for_6_hosts(
    root, hosts_with_vms, group_a, make_vm
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from labs.models import Host

    def count() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert root.get(reverse("admin:labs_host_changelist")).status_code == 200
        return len(captured)

    count()  # warm the caches (content types)
    few = count()
    for n in range(3, 7):
        host = Host.objects.create(
            name=f"h{n}", uri="qemu:///system", vcpus=4, memory_mib=8192, disk_gib=100
        )
        make_vm(group_a, name=f"vm{n}", host=host)
    assert count() == few


def test_the_host_page_lists_its_vms_read_only_and_still_saves(
    root, hosts_with_vms, group_a, make_vm
):
    import re

    from django.db import connection
    from django.forms.models import model_to_dict
    from django.test.utils import CaptureQueriesContext

    h1, _ = hosts_with_vms
    url = reverse("admin:labs_host_change", args=[h1.pk])
    root.get(url)  # warm the caches (content types)
    with CaptureQueriesContext(connection) as two:
        page = root.get(url).content.decode()
    assert "VMs on this host" in page
    assert "Alpha/vm1" in page and "Bravo/vm1" in page
    assert "Bravo/old" not in page and "Bravo/vm2" not in page
    assert 'name="vms-0-vcpus"' not in page  # read-only
    assert (
        reverse("admin:labs_vm_change", args=[h1.vms.get(name="vm1", group__name="Alpha").pk])
        in page
    )
    for n in range(3, 7):
        make_vm(group_a, name=f"vm{n}")
    with CaptureQueriesContext(connection) as six:
        assert "Alpha/vm6" in root.get(url).content.decode()
    assert len(six) == len(two)

    management = dict(re.findall(r'name="(vms-[A-Z_]+)"[^>]*value="(\d*)"', page))
    data = {k: v for k, v in model_to_dict(h1).items() if v is not None and k != "id"}
    data = {**data, **management, "ssh_address": "lab.example.edu", "_save": "Save"}
    for flag in ("enabled", "draining"):
        if not data.pop(flag):
            continue
        data[flag] = "on"
    response = root.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    h1.refresh_from_db()
    assert h1.ssh_address == "lab.example.edu" and h1.vms.live().count() == 6


def test_the_vms_list_shows_and_filters_by_host(client_for, ines, hosts_with_vms):
    _, h2 = hosts_with_vms
    client = client_for(ines)
    page = client.get(reverse("admin:labs_vm_changelist")).content.decode()
    assert '<td class="field-host nowrap">h2</td>' in page
    assert f"?host__id__exact={h2.pk}" in page  # the filter
    listed = client.get(
        reverse("admin:labs_vm_changelist"), {"host__id__exact": h2.pk}
    ).content.decode()
    assert "Bravo/vm2" in listed and "Alpha/vm1" not in listed


def test_an_instructor_raises_a_groups_quota_but_nothing_else(client_for, ines, group_a):
    client = client_for(ines)
    url = reverse("admin:labs_group_change", args=[group_a.pk])
    response = client.post(
        url,
        {
            "quota_vms": "5",
            "quota_vcpus": "",
            "quota_memory_mib": "",
            "quota_disk_gib": "",
            "name": "Renamed",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    group_a.refresh_from_db()
    assert group_a.quota_vms == 5 and group_a.name == "Alpha"


def test_the_audit_trail_is_read_only(client_for, vm_of_a, group_a):
    from labs.models import Operation

    op = Operation.objects.create(vm=vm_of_a, kind="reboot", status="failed", error="x")
    admin = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    client = client_for(admin)
    url = reverse("admin:labs_operation_change", args=[op.pk])
    client.post(url, {"kind": "start", "status": "succeeded"})
    op.refresh_from_db()
    assert (op.kind, op.status) == ("reboot", "failed")


def test_a_group_name_with_a_newline_breaks_no_bulk_review(
    client_for, ines, group_a, group_b, django_capture_on_commit_callbacks
):
    """A name written before names were checked (or by hand) still reviews and mails."""
    Group.objects.filter(pk=group_a.pk).update(name="Alpha\nBcc: everyone@example.edu")
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(ines).post(
            reverse(CHANGELIST),
            {"action": "approve", ACTION_CHECKBOX_NAME: [group_a.pk, group_b.pk]},
            follow=True,
        )
    assert response.status_code == 200
    assert "Approved 2 group(s)" in response.content.decode()
    assert set(Group.objects.values_list("status", flat=True)) == {GroupStatus.APPROVED}
    assert len(mail.outbox) == 3
    assert all("\n" not in m.subject and m.bcc == [] for m in mail.outbox)


# --- TAs and instructors: who may do what (docs/decisions.md) ------------------------------


def _quota_post(client, group, vms: str):
    return client.post(
        reverse("admin:labs_group_change", args=[group.pk]),
        {
            "quota_vms": vms,
            "quota_vcpus": "",
            "quota_memory_mib": "",
            "quota_disk_gib": "",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )


def test_a_ta_reviews_groups_but_raises_no_quota(
    client_for, tara, group_a, django_capture_on_commit_callbacks
):
    client = client_for(tara)
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse(CHANGELIST), {"action": "approve", ACTION_CHECKBOX_NAME: [group_a.pk]})
    group_a.refresh_from_db()
    assert group_a.status == GroupStatus.APPROVED
    _quota_post(client, group_a, "5")
    group_a.refresh_from_db()
    assert group_a.quota_vms is None  # the field is read-only for a TA


def test_an_instructor_raises_a_quota_only_up_to_the_courses_cap(client_for, ines, group_a):
    Course.objects.filter(pk=group_a.course_id).update(quota_cap_vms=3)
    response = _quota_post(client_for(ines), group_a, "4")
    assert response.status_code == 200
    assert "At most 3 for this course" in response.content.decode()
    group_a.refresh_from_db()
    assert group_a.quota_vms is None
    assert _quota_post(client_for(ines), group_a, "3").status_code == 302
    group_a.refresh_from_db()
    assert group_a.quota_vms == 3


def test_a_ta_of_another_course_sees_none_of_these_groups(client_for, otto, group_a):
    page = client_for(otto).get(reverse(CHANGELIST)).content.decode()
    assert "Alpha" not in page
    change = client_for(otto).get(reverse("admin:labs_group_change", args=[group_a.pk]))
    assert change.status_code in (302, 403, 404)
