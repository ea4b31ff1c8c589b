"""The admin's course-image parts with the cast: the course's instructor captures a VM and
switches the template's image; a TA, another course's staff and students cannot; the
superuser imports (a hostile file refused on the page, nothing left behind)."""

import subprocess

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.urls import reverse

from labs.choices import ImageCopyState, OperationKind
from labs.compute import dispatch, image_copies
from labs.models import Image, ImageCopy, Operation, VmTemplate

pytestmark = pytest.mark.django_db

VMS = "admin:labs_vm_changelist"


@pytest.fixture
def sent(monkeypatch):
    """Operations recorded instead of sent to the broker."""
    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "t-1")
    return ids


@pytest.fixture
def vm(make_vm, group_a):
    return make_vm(group_a)


def capture(client, vm, name="prepared"):
    return client.post(
        reverse(VMS),
        {"action": "capture", ACTION_CHECKBOX_NAME: [vm.pk], "name": name},
        follow=True,
    )


def test_the_courses_instructor_captures_a_vm_from_the_admin(client_for, ines, vm, sent):
    client = client_for(ines)
    form = client.post(reverse(VMS), {"action": "capture", ACTION_CHECKBOX_NAME: [vm.pk]})
    assert "Capture a VM as a course image" in form.content.decode()
    response = capture(client, vm)
    assert "Capturing" in response.content.decode()
    op = Operation.objects.get()
    assert (op.vm, op.kind, op.params["name"], op.requested_by) == (
        vm, OperationKind.CAPTURE, "prepared", ines)  # fmt: skip


@pytest.mark.parametrize("who", ["tara", "olga", "otto"])
def test_a_ta_or_another_courses_staff_cannot_capture(request, client_for, vm, who, sent):
    response = capture(client_for(request.getfixturevalue(who)), vm)
    assert response.status_code == 200
    assert not Operation.objects.exists()


def test_a_student_cannot_open_the_admin_to_capture(client_for, alice, vm, sent):
    response = client_for(alice).post(
        reverse(VMS), {"action": "capture", ACTION_CHECKBOX_NAME: [vm.pk], "name": "x"}
    )
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not Operation.objects.exists()


def test_a_capture_under_a_taken_name_says_why(client_for, ines, vm, sent):
    response = capture(client_for(ines), vm, name="deb")
    assert "An image named deb exists already" in response.content.decode()
    assert not Operation.objects.exists()


# --- the template's image --------------------------------------------------------------------


@pytest.fixture
def template(course, vm):
    return VmTemplate.objects.create(course=course, image=vm.image)


@pytest.fixture
def new_image(course, vm):
    image = Image.objects.create(
        name="prepared", os="Debian 12", path="/srv/p.qcow2", course=course, everywhere=False
    )
    ImageCopy.objects.create(image=image, host=vm.host, state=ImageCopyState.PRESENT)
    return image


def switch(client, template, image):
    url = reverse("admin:labs_vmtemplate_change", args=[template.pk])
    return client.post(url, {"image": image.pk}, follow=True)


def test_the_instructor_switches_the_templates_image_and_nothing_else(
    client_for, ines, template, new_image
):
    client = client_for(ines)
    url = reverse("admin:labs_vmtemplate_change", args=[template.pk])
    page = client.get(url).content.decode()
    assert "prepared" in page
    switch(client, template, new_image)
    template.refresh_from_db()
    assert template.image == new_image and template.count == 1


@pytest.mark.parametrize("who", ["tara", "olga"])
def test_a_ta_or_another_courses_instructor_cannot_switch_it(
    request, client_for, template, new_image, who
):
    response = switch(client_for(request.getfixturevalue(who)), template, new_image)
    template.refresh_from_db()
    assert template.image.name == "deb"
    assert response.status_code in (200, 403)


def test_an_image_on_no_host_is_refused_with_the_reason(client_for, ines, template, new_image):
    ImageCopy.objects.all().delete()
    response = switch(client_for(ines), template, new_image)
    assert "No host holds the image prepared yet" in response.content.decode()
    template.refresh_from_db()
    assert template.image.name == "deb"


# --- importing and deleting (superusers) ------------------------------------------------------


@pytest.fixture
def root(db):
    return get_user_model().objects.create_superuser("root", "root@example.edu", None)


def test_a_hostile_upload_is_refused_on_the_import_page_and_leaves_nothing(
    client_for, root, course, tmp_path, settings, monkeypatch
):
    settings.STRATUS_IMAGE_DIR = str(tmp_path / "store")
    monkeypatch.setattr(image_copies, "driver_for", lambda host: pytest.fail("no copy"))
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", str(evil),
         "1M"], check=True,
    )  # fmt: skip
    response = client_for(root).post(
        reverse("admin:labs_image_add"),
        {"path": str(evil), "course": course.pk, "name": "evil", "login_user": "student"},
    )
    assert "names a backing file (/etc/shadow)" in response.content.decode()
    assert not Image.objects.filter(name="evil").exists()
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_instructors_do_not_import_images(client_for, ines):
    assert client_for(ines).get(reverse("admin:labs_image_add")).status_code == 403


def test_deleting_an_image_in_use_is_refused(client_for, root, template):
    url = reverse("admin:labs_image_delete", args=[template.image.pk])
    client_for(root).post(url, {"post": "yes"}, follow=True)
    assert Image.objects.filter(pk=template.image.pk).exists()
