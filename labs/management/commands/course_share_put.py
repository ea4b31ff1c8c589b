"""Put files into a course's share (labs/compute/shares.py): every VM of the course with
shares reads them at /srv/course at once. All of them or, with the reason, none."""

import os
import stat
from contextlib import ExitStack

from django.core.management.base import BaseCommand, CommandError

from labs.compute import shares
from labs.errors import StratusError
from labs.models import Course


class Command(BaseCommand):
    help = "Put files into a course's share (/srv/course in its VMs), or --remove them."

    def add_arguments(self, parser):
        parser.add_argument("course", help="the course's slug")
        parser.add_argument("files", nargs="+", help="files to put (their names are kept)")
        parser.add_argument(
            "--remove", action="store_true", help="take the named files out of the share"
        )

    def handle(self, *args, course, files, remove, **options):
        found = Course.objects.filter(slug=course).first()
        if found is None:
            raise CommandError(f"No course with slug {course!r}.")
        try:
            if remove:
                shares.course_share_remove(course=found, names=files, by=None)
                self.stdout.write(f"Removed {len(files)} file(s) from the share of {found.slug}.")
                return
            with ExitStack() as stack:
                uploads = [self._upload(path, stack) for path in files]
                names = shares.course_share_put(course=found, uploads=uploads, by=None)
        except StratusError as error:
            raise CommandError(str(error)) from None
        for name in names:
            self.stdout.write(f"  {name}")
        self.stdout.write(f"Put {len(names)} file(s) into the share of {found.slug}.")

    @staticmethod
    def _upload(path: str, stack: ExitStack) -> shares.Upload:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise CommandError(f"{path} is not a regular file.")
            handle = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - closed by the stack
        except OSError as error:
            raise CommandError(f"{path}: {error.strerror}") from None
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):  # changed since
            raise CommandError(f"{path} is not a regular file.")
        return shares.Upload(name=os.path.basename(path), data=handle, size=info.st_size)
