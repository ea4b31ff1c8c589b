from django.conf import settings
from django.core.management.base import BaseCommand

from labs.services.demo import demo_load


class Command(BaseCommand):
    help = "Create or refresh the demo course and print its logins (new passwords each time)."

    def handle(self, *args, **options):
        course, logins = demo_load()
        self.stdout.write(f"Demo course {course.slug!r}: {course.title}")
        self.stdout.write(f"Open {settings.SITE_URL}/ and sign in as one of:")
        for login in logins:
            self.stdout.write(f"  {login.username:<12} {login.password:<16} ({login.role})")
        self.stdout.write("Instructors review groups at " + settings.SITE_URL + "/admin/")
