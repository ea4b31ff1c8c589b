from django.core.management.base import BaseCommand, CommandError

from labs.compute import archives
from labs.drivers.base import HypervisorError
from labs.errors import StratusError
from labs.models import Host


class Command(BaseCommand):
    help = (
        "Bring back a VM archived at the end of term: the same group, its name (or "
        "--name), the archived disk copied into the host's pool. The archive is checked "
        "first (its sha256, no backing or data file)."
    )

    def add_arguments(self, parser):
        parser.add_argument("archive", help="the archive's id, or the path of its .qcow2")
        parser.add_argument("--host", help="the host to restore it on (default: its old host)")
        parser.add_argument("--name", default="", help="a new name, when its name is taken")

    def handle(self, *args, archive, host, name, **options):
        target = None
        if host:
            target = Host.objects.filter(name=host).first()
            if target is None:
                known = ", ".join(Host.objects.values_list("name", flat=True)) or "none"
                raise CommandError(f"No host named {host!r} (hosts: {known}).")
        try:
            found = archives.archive_find(archive)
            self.stdout.write(f"Checking {found.path} ({found.size_bytes / 2**20:.0f} MiB)…")
            done = archives.archive_restore(archive=found, host=target, name=name)
        except StratusError as error:
            raise CommandError(str(error)) from None
        except HypervisorError as error:
            raise CommandError(f"Not restored: {error}") from None
        vm = done.vm
        self.stdout.write(
            f"Restored {vm.group.course.slug}/{vm.group.name}/{vm.name} on {vm.host.name} "
            f"in {done.seconds:.1f} s; {vm.ssh_command or 'running'}."
        )
