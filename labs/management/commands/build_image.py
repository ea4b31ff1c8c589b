from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from labs.tooling.images import ImageBuildError, image_build
from labs.tooling.registration import image_register


class Command(BaseCommand):
    help = "Build the Debian 12 base image from Debian packages (if missing) and register it."

    def add_arguments(self, parser):
        parser.add_argument("name", nargs="?", default="debian-12")
        parser.add_argument("--dest", default=settings.STRATUS_IMAGE_DIR, type=Path)
        parser.add_argument(
            "--no-register", action="store_true", help="only build; do not touch the database"
        )

    def handle(self, *args, name, dest, no_register, **options):
        try:
            path = image_build(name=name, dest_dir=dest, log=self.stdout.write)
        except ImageBuildError as error:
            raise CommandError(str(error)) from None
        if no_register:
            return
        image = image_register(name=name, path=path, os="Debian 12 (bookworm)")
        self.stdout.write(f"Registered image {image.name}: {image.path} (sha256 {image.sha256})")
