from django.core.management.base import BaseCommand, CommandError

from labs.compute.image_copies import image_distribute
from labs.models import Host, Image


class Command(BaseCommand):
    help = (
        "Copy an imported or captured image to every host that is up and lacks it (or to "
        "--host), from this machine's image store; each copy is checksummed on its host."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the image's name")
        parser.add_argument("--host", action="append", default=[], help="only this host")

    def handle(self, *args, name, host, **options):
        image = Image.objects.filter(name=name).first()
        if image is None:
            raise CommandError(f"No image {name!r}.")
        if image.everywhere:
            raise CommandError(f"{name} is kept on every host by the operator (a built image).")
        hosts = Host.objects.filter(name__in=host) if host else None
        copies = image_distribute(image=image, hosts=hosts)
        for copy in copies:
            self.stdout.write(
                f"{copy.host.name}: {copy.state}{' - ' + copy.error if copy.error else ''}"
            )
        if not copies:
            self.stdout.write("Every host that is up holds it already.")
        if any(c.error for c in copies):
            raise CommandError("Some copies failed (above).")
