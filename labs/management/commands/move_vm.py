import time

from django.core.management.base import BaseCommand, CommandError

from labs.choices import OperationStatus
from labs.compute.moves import vm_move_request
from labs.errors import StratusError
from labs.models import Host, Operation, Vm


class Command(BaseCommand):
    help = (
        "Move a stopped VM, with its disk and snapshots, to another host (a cold move). "
        "The VM is named by its id or as COURSE/GROUP/VM; its SSH port changes."
    )

    def add_arguments(self, parser):
        parser.add_argument("vm", help="the VM's id, or course/group/vm (os101/Keepers/vm1)")
        parser.add_argument("--to", required=True, help="the destination host's name")
        parser.add_argument(
            "--wait", type=int, default=0, help="wait up to this many seconds for it to end"
        )

    def handle(self, *args, vm, to, wait, **options):
        target = Host.objects.filter(name=to).first()
        if target is None:
            known = ", ".join(Host.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"No host named {to!r} (hosts: {known}).")
        try:
            op = vm_move_request(vm=_vm_named(vm), to=target, by=None)
        except StratusError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"Move of {op.vm} to {target.name} queued (operation {op.pk}).")
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            op = Operation.objects.get(pk=op.pk)
            if op.status == OperationStatus.SUCCEEDED:
                self.stdout.write(
                    f"Moved: {op.vm} is on {target.name}, SSH port {op.vm.ssh_port}."
                )
                return
            if op.status == OperationStatus.FAILED:
                raise CommandError(f"The move failed: {op.error}")
            time.sleep(1)
        if wait:
            raise CommandError(f"Still {op.status} after {wait} s ({op.progress}).")


def _vm_named(text: str) -> Vm:
    live = Vm.objects.live().select_related("group__course", "host")
    if text.isdigit():
        vm = live.filter(pk=int(text)).first()
    else:
        parts = text.split("/")
        if len(parts) != 3:
            raise CommandError(f"{text!r} is neither a VM id nor course/group/vm.")
        course, group, name = parts
        vm = live.filter(group__course__slug=course, group__name=group, name=name).first()
    if vm is None:
        raise CommandError(f"No live VM {text!r}.")
    return vm
