from django.core.management.base import BaseCommand, CommandError

from labs.compute.drain import host_drain
from labs.models import Host


class Command(BaseCommand):
    help = (
        "Drain a host: mark it draining, then move every VM on it to hosts with room "
        "(running ones live, stopped ones cold), a few at a time; list what stayed."
    )

    def add_arguments(self, parser):
        parser.add_argument("host", help="the host's name")
        parser.add_argument("--parallel", type=int, default=2, help="moves at once (1-8)")
        parser.add_argument("--timeout", type=int, default=3600, help="seconds in all")

    def handle(self, *args, host, parallel, timeout, **options):
        found = Host.objects.filter(name=host).first()
        if found is None:
            known = ", ".join(Host.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"No host named {host!r} (hosts: {known}).")
        if not 1 <= parallel <= 8:
            raise CommandError("--parallel is 1 to 8.")
        report = host_drain(
            host=found, by=None, parallel=parallel, timeout=timeout, say=self.stdout.write
        )
        if not report.drained:
            stayed = "; ".join(f"{vm}: {why}" for vm, why in report.stayed)
            raise CommandError(f"{len(report.stayed)} VMs stayed on {found.name}: {stayed}")
