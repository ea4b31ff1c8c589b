"""The demo course that `make run` loads: one instructor and a few students.

Passwords are random and new on every load (printed once by the command); there is no
default password anywhere.
"""

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.contrib.auth import get_user_model
from django.db import transaction

from labs.choices import Role, VirtType
from labs.models import Course, Host, Image, Membership, VmTemplate
from labs.services.catalog import host_register, image_register

DEMO_COURSE = {"slug": "demo-os", "title": "Operating Systems (demo)", "term": "Demo term"}
DEMO_PEOPLE = [
    ("instructor", "Ines", "Instructor", Role.INSTRUCTOR),
    ("alice", "Alice", "Adams", Role.STUDENT),
    ("bob", "Bob", "Brown", Role.STUDENT),
    ("carol", "Carol", "Chen", Role.STUDENT),
    ("dave", "Dave", "Diaz", Role.STUDENT),
]


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str
    role: str


def demo_load(*, image_path: Path | None = None) -> tuple[Course, list[DemoLogin]]:
    """Create or refresh the demo course and its people; returns their new passwords.

    With a base image, this machine becomes the host ``local`` (qemu:///system, TCG,
    user-mode networking with SSH forwarded on 127.0.0.1) and the course gets a VM
    template, so approving a demo group boots a real VM.
    """
    User = get_user_model()
    logins = []
    with transaction.atomic():
        course, _ = Course.objects.update_or_create(slug=DEMO_COURSE["slug"], defaults=DEMO_COURSE)
        for username, first, last, role in DEMO_PEOPLE:
            user, _ = User.objects.get_or_create(
                username=username,
                defaults={
                    "first_name": first,
                    "last_name": last,
                    "email": f"{username}@example.invalid",
                },
            )
            user.is_staff = role != Role.STUDENT
            password = secrets.token_urlsafe(9)
            user.set_password(password)
            user.save()
            Membership.objects.update_or_create(course=course, user=user, defaults={"role": role})
            logins.append(DemoLogin(username=username, password=password, role=role))
        if image_path is not None and image_path.is_file():
            _demo_machines(course, image_path)
    return course, logins


def _demo_machines(course: Course, image_path: Path) -> None:
    image = Image.objects.filter(name="debian-12").first()
    if image is None or image.path != str(image_path):
        image = image_register(name="debian-12", path=image_path, os="Debian 12 (bookworm)")
    if not Host.objects.filter(name="local").exists():
        host_register(
            name="local",
            uri="qemu:///system",
            vcpus=os.cpu_count() or 2,
            memory_mib=8192,
            disk_gib=100,
            virt_type=VirtType.QEMU,
            storage_dir="/var/lib/stratus/vms",
        )
    VmTemplate.objects.update_or_create(
        course=course,
        defaults={"image": image, "count": 1, "vcpus": 1, "memory_mib": 1024, "disk_gib": 4},
    )
