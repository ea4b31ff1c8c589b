"""The course share from the admin with the cast: the course's instructor sees the files,
puts new ones (several at once) and removes one; a bad name or a too-large file is refused
on the page with nothing put; a TA, another course's staff and students cannot."""

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from labs.compute import shares

pytestmark = pytest.mark.django_db

COURSES = "admin:labs_course_changelist"


@pytest.fixture(autouse=True)
def shares_dir(settings, tmp_path):
    settings.STRATUS_SHARES_DIR = str(tmp_path / "shares")
    settings.SHARE_FILE_MAX_MIB = 1


def post(client, course, **data):
    return client.post(
        reverse(COURSES),
        {"action": "share_put", ACTION_CHECKBOX_NAME: [course.pk], "share_put": "1", **data},
        follow=True,
    )


def test_the_instructor_puts_and_removes_files_of_the_course_share(client_for, ines, course):
    client = client_for(ines)
    form = client.post(
        reverse(COURSES), {"action": "share_put", ACTION_CHECKBOX_NAME: [course.pk]}
    )
    page = form.content.decode()
    assert "The course share of os101" in page and 'enctype="multipart/form-data"' in page
    assert "Shared files are off for this course" in page
    files = [SimpleUploadedFile("notes.txt", b"hello"), SimpleUploadedFile("lab.c", b"int x;")]
    response = post(client, course, files=files)
    assert "2 file(s) put, 0 removed" in response.content.decode()
    assert shares.course_share_files(course=course) == [("lab.c", 6), ("notes.txt", 5)]
    page = client.post(
        reverse(COURSES), {"action": "share_put", ACTION_CHECKBOX_NAME: [course.pk]}
    ).content.decode()
    assert "notes.txt (5 bytes)" in page
    response = post(client, course, remove=["lab.c"])
    assert "0 file(s) put, 1 removed" in response.content.decode()
    assert shares.course_share_files(course=course) == [("notes.txt", 5)]


def test_a_bad_name_or_a_too_large_file_is_refused_on_the_page_and_nothing_is_put(
    client_for, ines, course
):
    client = client_for(ines)
    files = [SimpleUploadedFile("ok.txt", b"x"), SimpleUploadedFile(".bashrc", b"x")]
    response = post(client, course, files=files)
    assert "is not a file name the course share takes" in response.content.decode()
    big = SimpleUploadedFile("big.bin", b"x" * (1024 * 1024 + 1))
    response = post(client, course, files=[SimpleUploadedFile("ok.txt", b"x"), big])
    assert "at most 1 MiB" in response.content.decode()
    assert shares.course_share_files(course=course) == []


@pytest.mark.parametrize("who", ["tara", "olga", "otto"])
def test_a_ta_or_another_courses_staff_cannot_put_files(request, client_for, course, who):
    response = post(
        client_for(request.getfixturevalue(who)),
        course,
        files=[SimpleUploadedFile("notes.txt", b"x")],
    )
    assert response.status_code in (200, 403, 404)
    assert shares.course_share_files(course=course) == []


def test_a_student_cannot_open_the_admin_to_put_files(client_for, alice, course):
    response = client_for(alice).post(
        reverse(COURSES),
        {"action": "share_put", ACTION_CHECKBOX_NAME: [course.pk], "share_put": "1"},
    )
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
