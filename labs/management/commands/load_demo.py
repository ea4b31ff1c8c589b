from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from labs.services.demo import demo_load


class Command(BaseCommand):
    help = (
        "Create or refresh the demo course (and, given a base image, this machine as its "
        "host) and print the logins: new passwords each time."
    )

    def add_arguments(self, parser):
        parser.add_argument("--image", type=Path, help="base image for the demo's VMs")

    def handle(self, *args, image, **options):
        course, logins = demo_load(image_path=image)
        self.stdout.write(f"Demo course {course.slug!r}: {course.title}")
        if hasattr(course, "vm_template"):
            self.stdout.write(
                f"Approved groups get a VM from {course.vm_template.image.path} on this machine."
            )
        self.stdout.write(f"Open {settings.SITE_URL}/ and sign in as one of:")
        for login in logins:
            self.stdout.write(f"  {login.username:<12} {login.password:<16} ({login.role})")
        self.stdout.write("Instructors review groups at " + settings.SITE_URL + "/admin/")
