import time

from django.core.management.base import BaseCommand, CommandError

from labs.choices import OperationStatus
from labs.compute.images import vm_capture_request
from labs.errors import StratusError
from labs.management.commands.move_vm import _vm_named
from labs.models import Operation


class Command(BaseCommand):
    help = (
        "Capture a VM's disk as a new image of its course (flattened, its SSH host keys, "
        "machine-id and authorized_keys removed, checksummed, copied to the hosts). A "
        "running VM's file systems are frozen while its disk is read."
    )

    def add_arguments(self, parser):
        parser.add_argument("vm", help="the VM's id, or course/group/vm (os101/Keepers/vm1)")
        parser.add_argument("--name", required=True, help="the new image's name (a slug)")
        parser.add_argument("--os", default="", help="what it is, for people")
        parser.add_argument("--wait", type=int, default=0, help="wait up to this many seconds")

    def handle(self, *args, vm, name, os, wait, **options):
        try:
            op = vm_capture_request(vm=_vm_named(vm), name=name, by=None, os_name=os)
        except StratusError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"Capture of {op.vm} as {name} queued (operation {op.pk}).")
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            op = Operation.objects.get(pk=op.pk)
            if op.status == OperationStatus.SUCCEEDED:
                self.stdout.write(f"Captured: {op.progress}")
                return
            if op.status == OperationStatus.FAILED:
                raise CommandError(f"The capture failed: {op.error}")
            time.sleep(1)
        if wait:
            raise CommandError(f"Still {op.status} after {wait} s ({op.progress}).")
