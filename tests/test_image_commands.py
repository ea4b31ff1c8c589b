"""manage.py import_image and distribute_image: a summary line per host, and a refusal
that names its reason with a non-zero exit."""

import subprocess

import pytest
from django.core.management import CommandError, call_command

from labs.compute import image_copies
from labs.models import Image

pytestmark = pytest.mark.django_db


def test_a_hostile_upload_is_refused_by_the_command_with_the_reason(tmp_path, settings, course):
    settings.STRATUS_IMAGE_DIR = str(tmp_path / "store")
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/new.data",
         str(evil), "1M"], check=True,
    )  # fmt: skip
    with pytest.raises(CommandError, match="Image refused: .*external data file"):
        call_command("import_image", str(evil), "--course", course.slug, "--name", "evil")
    assert not Image.objects.exists()


def test_an_import_prints_the_image_and_each_hosts_copy(
    tmp_path, settings, course, capsys, monkeypatch, make_vm, group_a
):
    make_vm(group_a)  # host h1
    settings.STRATUS_IMAGE_DIR = str(tmp_path / "store")

    class Down:
        def image_digest(self, path):
            from labs.drivers.base import HypervisorUnavailable

            raise HypervisorUnavailable("host h1 did not answer")

    monkeypatch.setattr(image_copies, "driver_for", lambda host: Down())
    upload = tmp_path / "up.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(upload), "8M"], check=True)
    call_command("import_image", str(upload), "--course", course.slug, "--name", "web-lab")
    out = capsys.readouterr().out
    assert "Imported web-lab:" in out and "sha256 " in out
    assert "h1: failed - host h1 did not answer" in out
    with pytest.raises(CommandError, match="Some copies failed"):
        call_command("distribute_image", "web-lab")


def test_an_unknown_course_is_named(tmp_path):
    with pytest.raises(CommandError, match="No course 'nope'"):
        call_command("import_image", str(tmp_path / "x"), "--course", "nope", "--name", "x")
