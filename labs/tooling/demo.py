"""The demo course that `make run` loads: one instructor, four students and, with a base
image, one approved group whose VM the worker provisions and boots.

Passwords are random and new on every load (printed once by the command); there is no
default password anywhere. The demo group's SSH key pair is made here; its private half
stays in a file (0600), never printed. Loading again changes nothing but the passwords:
no second group, no second VM.
"""

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction

from labs.choices import GroupStatus, OperationStatus, Role, VirtType
from labs.compute import dispatch
from labs.models import Course, Group, Host, Image, Membership, Operation, Vm, VmTemplate
from labs.people.groups import group_approve, group_register
from labs.tooling.registration import host_register, image_register

DEMO_COURSE = {"slug": "demo-os", "title": "Operating Systems (demo)", "term": "Demo term"}
DEMO_GROUP = {
    "name": "Demo group",
    "by": "alice",
    "members": ["bob"],
    "project_title": "A first look at Stratus",
    "project_idea": "The group `make run` creates: its VM boots, and its console is one click.",
}
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


@dataclass
class DemoGroup:
    group: Group | None = None
    created: bool = False
    vms: list[Vm] = field(default_factory=list)
    key_path: Path | None = None  # the private key, when it exists
    notes: list[str] = field(default_factory=list)  # what the operator should know


@dataclass
class Demo:
    course: Course
    logins: list[DemoLogin]
    group: DemoGroup


def demo_load(*, image_path: Path | None = None, key_path: Path | None = None) -> Demo:
    """Create or refresh the demo course and its people, with new passwords.

    With a base image, this machine becomes the host ``local`` (qemu:///system, TCG,
    user-mode networking with SSH forwarded on 127.0.0.1), the course gets a VM template,
    and, given ``key_path``, the approved "Demo group" (alice and bob) exists: approving it
    queues its VM's provisioning for the worker (on commit), as the admin's action does.
    """
    User = get_user_model()
    logins = []
    demo_group = DemoGroup()
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
            if key_path is not None:
                demo_group = _demo_group(course, key_path)
    return Demo(course=course, logins=logins, group=demo_group)


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


def _demo_group(course: Course, key_path: Path) -> DemoGroup:
    """The approved demo group, made once through the same services as a real one."""
    result = DemoGroup()
    group = Group.objects.filter(course=course, name=DEMO_GROUP["name"]).first()
    if group is None:
        User = get_user_model()
        public_key = _demo_key(key_path)
        try:
            with transaction.atomic():
                group = group_register(
                    course=course,
                    by=User.objects.get(username=DEMO_GROUP["by"]),
                    name=DEMO_GROUP["name"],
                    member_usernames=DEMO_GROUP["members"],
                    project_title=DEMO_GROUP["project_title"],
                    project_idea=DEMO_GROUP["project_idea"],
                    ssh_public_key=public_key,
                )
        except ValidationError as error:
            # e.g. alice already signed up another group in an earlier demo: keep that.
            result.notes.append(
                "No demo group was created: " + " ".join(_messages(error)) + " Sign in as "
                "the instructor and approve a group in the admin instead."
            )
            return result
        result.created = True
    elif not key_path.is_file():
        result.notes.append(
            f"{key_path} is gone, so SSH into the demo VM needs another key; the console "
            "still works."
        )
    if group.status != GroupStatus.APPROVED:
        instructor = get_user_model().objects.get(username="instructor")
        group = group_approve(group=group, by=instructor, note="Approved by make run (demo).")
    else:
        # From an earlier load: a provision whose message was lost (Redis restarted before
        # a worker took it) would wait forever, so send what is queued again. A duplicate
        # message is harmless: only one run can claim the operation.
        for op_id in Operation.objects.filter(
            vm__group=group, status=OperationStatus.QUEUED, vm__host__isnull=False
        ).values_list("pk", flat=True):
            dispatch.operation_send(operation_id=op_id)
    result.group = group
    result.vms = list(group.vms.select_related("host", "image").order_by("name"))
    result.key_path = key_path if key_path.is_file() else None
    return result


def _demo_key(key_path: Path) -> str:
    """The demo group's public key: the pair at ``key_path`` (made with ssh-keygen when
    missing; the private half is 0600 and is never printed)."""
    public = key_path.with_name(key_path.name + ".pub")
    if not (key_path.is_file() and public.is_file()):
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        ssh_keygen = shutil.which("ssh-keygen")
        if ssh_keygen is None:
            raise RuntimeError("ssh-keygen is missing: install openssh-client")
        subprocess.run(  # noqa: S603 - argument list, no shell
            [
                ssh_keygen,
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "stratus-demo-group",
                "-f",
                str(key_path),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    key_path.chmod(0o600)
    return public.read_text()


def _messages(error: ValidationError) -> list[str]:
    if hasattr(error, "message_dict"):
        return [m for messages in error.message_dict.values() for m in messages]
    return error.messages
