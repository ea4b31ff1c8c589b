from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from labs.errors import StratusError
from labs.models import Course
from labs.people.rollover import course_rollover


class Command(BaseCommand):
    help = (
        "Make next term's course from COURSE: the same VM template, quotas, clock and "
        "weekly classes, the same instructors and TAs, no groups (docs/course-clock.md)."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug", help="the course to copy")
        parser.add_argument("--new-slug", required=True, help="the new course's slug")
        parser.add_argument("--term", required=True, help="the new term, e.g. 'Spring 2027'")

    def handle(self, *args, slug, new_slug, term, **options):
        course = Course.objects.filter(slug=slug).first()
        if course is None:
            raise CommandError(f"No course {slug!r}.")
        try:
            new = course_rollover(course=course, slug=new_slug, term=term)
        except StratusError as error:
            raise CommandError(str(error)) from None
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        staff = new.memberships.count()
        sessions = new.class_sessions.count()
        self.stdout.write(
            f"Created {new.slug} ({new.term}) from {course.slug}: {sessions} weekly "
            f"class(es), {staff} staff; set its signup dates, deadline and end of term."
        )
