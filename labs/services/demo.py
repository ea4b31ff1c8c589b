"""The demo course that `make run` loads: one instructor and a few students.

Passwords are random and new on every load (printed once by the command); there is no
default password anywhere.
"""

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from labs.choices import Role
from labs.models import Course, Membership

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


def demo_load() -> tuple[Course, list[DemoLogin]]:
    """Create or refresh the demo course and its people; returns their new passwords."""
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
    return course, logins
