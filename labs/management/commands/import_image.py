from django.core.management.base import BaseCommand, CommandError

from labs.compute.images import image_import
from labs.errors import StratusError
from labs.models import Course


class Command(BaseCommand):
    help = (
        "Import a qcow2 file as a course image: checked (qcow2 only, virtual size within "
        "IMAGE_MAX_VIRTUAL_GIB, no backing file, no external data file, qemu-img check "
        "clean), copied into the image store with any backing cut off, checksummed, "
        "registered and copied to every host that is up. A refused file leaves nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="the qcow2 file (an operator's upload)")
        parser.add_argument("--course", help="the course's slug (none: any course may use it)")
        parser.add_argument("--name", required=True, help="the image's name (a slug)")
        parser.add_argument("--os", default="", help="what it is, for people")
        parser.add_argument("--login-user", default="student")
        parser.add_argument("--no-distribute", action="store_true", help="copy to no host")

    def handle(self, *args, path, course, name, os, login_user, no_distribute, **options):
        target = None
        if course:
            target = Course.objects.filter(slug=course).first()
            if target is None:
                raise CommandError(f"No course {course!r}.")
        try:
            done = image_import(
                path=path,
                course=target,
                name=name,
                os_name=os,
                login_user=login_user,
                distribute=not no_distribute,
            )
        except StratusError as error:
            raise CommandError(str(error)) from None
        image = done.image
        self.stdout.write(
            f"Imported {image.name}: {image.path}, {image.virtual_size / 2**30:.1f} GiB "
            f"virtual, sha256 {image.sha256} (checked in {done.check_seconds:.2f} s, "
            f"copied in {done.copy_seconds:.2f} s)"
        )
        for copy in done.copies:
            self.stdout.write(
                f"  {copy.host.name}: {copy.state}{' - ' + copy.error if copy.error else ''}"
            )
