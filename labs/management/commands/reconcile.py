from django.core.management.base import BaseCommand

from labs.compute.reconcile import reconcile_all


class Command(BaseCommand):
    help = "Compare what should exist with what the hosts hold; restart what should run."

    def handle(self, *args, **options):
        placed, reports = reconcile_all()
        if placed:
            self.stdout.write(f"placed {placed} waiting VM(s)")
        for r in reports:
            if not r.reachable:
                self.stdout.write(f"{r.host}: did not answer; its VMs are marked unknown")
                continue
            self.stdout.write(
                f"{r.host}: {r.observed} VM(s) observed, {len(r.drift)} drifted, "
                f"{r.restarted} restarted"
            )
            for line in r.drift:
                self.stdout.write(f"  {line}")
