"""Shared files on the group page with the cast: a member of a course with shares reads
where the shares are and what they cost (the group share's files in the quota line); a
course without shares shows nothing of them; another group's member sees neither (404);
a suspend to disk posted for a VM with shares is refused on the page."""

import os
from datetime import timedelta

import pytest
import time_machine
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from labs.choices import OperationKind
from labs.compute import shares
from labs.models import Course, Operation, Vm, VmTemplate

pytestmark = pytest.mark.django_db


@pytest.fixture
def shared(course, group_a, make_vm, settings, tmp_path, monkeypatch):
    from labs.compute import dispatch

    monkeypatch.setattr(dispatch, "task_send", lambda op_id: "t-1")
    settings.STRATUS_SHARES_DIR = str(tmp_path / "shares")
    Course.objects.filter(pk=course.pk).update(shares=True)
    vm = make_vm(group_a, shares=True)
    image = vm.image
    VmTemplate.objects.create(
        course=course, image=image, count=1, vcpus=1, memory_mib=1024, disk_gib=10,
        quota_vms=2, quota_vcpus=2, quota_memory_mib=2048, quota_disk_gib=30,
    )  # fmt: skip
    return vm


def page(client, group):
    return client.get(reverse("labs:group_detail", args=[group.pk])).content.decode()


def test_a_member_reads_where_the_shares_are_and_the_group_share_in_the_quota(
    client_for, alice, bob, group_a, shared
):
    text = page(client_for(alice), group_a)
    assert "<code>/srv/group</code>" in text and "<code>/srv/course</code>" in text
    assert "20 of 30 GiB disk left" in text
    directory = shares.group_share_dir(group_a)
    os.makedirs(directory)
    with open(os.path.join(directory, "data.bin"), "wb") as f:
        f.write(b"x" * 4096)
    # What is on the disk is seen on the page once its cached part is out of date: within
    # PAGE_CACHE_SECONDS (labs/live/pagecache.py), the teammate's page too.
    later = timezone.now() + timedelta(seconds=settings.PAGE_CACHE_SECONDS + 1)
    with time_machine.travel(later, tick=False):
        assert "19 of 30 GiB disk left" in page(client_for(bob), group_a)


def test_a_course_without_shares_shows_nothing_of_them(client_for, alice, group_a, make_vm):
    make_vm(group_a)
    assert "/srv/group" not in page(client_for(alice), group_a)


def test_another_groups_member_sees_nothing(client_for, carol, group_a, group_b, shared):
    response = client_for(carol).get(reverse("labs:group_detail", args=[group_a.pk]))
    assert response.status_code == 404


def test_a_suspend_to_disk_of_a_vm_with_shares_is_refused_on_the_page(
    client_for, alice, group_a, shared
):
    url = reverse("labs:vm_operation", args=[shared.pk, OperationKind.SAVE])
    response = client_for(alice).post(url, follow=True)
    assert "cannot save to disk: shut it down" in response.content.decode()
    assert not Operation.objects.filter(vm=shared, kind=OperationKind.SAVE).exists()
    assert Vm.objects.get(pk=shared.pk).shares
