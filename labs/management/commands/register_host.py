from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from labs.choices import VirtType
from labs.consoles import tunnel
from labs.consoles.tunnel import SshRoute
from labs.drivers.base import HypervisorError
from labs.drivers.registry import driver_at
from labs.models import Host, Image
from labs.tooling.registration import host_register


def _port_range(text: str, option: str = "--ssh-ports", example: str = "22000-22999"):
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise CommandError(f"{option} is MIN-MAX, such as {example}, not {text!r}.") from None


class Command(BaseCommand):
    help = (
        "Register (or update) a hypervisor host after checking it: its libvirt URI answers, "
        "its storage directory can hold VMs, and which base images it has. Nothing is saved "
        "when a check fails. Its worker then serves the queue host.NAME."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the host's name (a slug; its queue is host.NAME)")
        parser.add_argument("--uri", required=True, help="its libvirt URI (docs/deploy.md)")
        parser.add_argument("--vcpus", type=int, default=4)
        parser.add_argument("--memory-mib", type=int, default=8192)
        parser.add_argument("--disk-gib", type=int, default=100)
        parser.add_argument("--storage-dir", default="/var/lib/stratus/vms")
        parser.add_argument("--ssh-ports", default="22000-22999", help="MIN-MAX")
        parser.add_argument(
            "--published-ports",
            default="",
            help="MIN-MAX: where guests' published ports are forwarded, apart from the SSH "
            "ports (default: the 1000 ports after them)",
        )
        parser.add_argument(
            "--virt-type", choices=VirtType.values, default=VirtType.AUTO, help="kvm, qemu, auto"
        )
        parser.add_argument(
            "--console-ssh", default="", help="user@host[:port] for console channels"
        )
        parser.add_argument(
            "--console-ssh-host-key", default="", help="the host's SSH public key line"
        )

    def handle(self, *args, name, uri, ssh_ports, storage_dir, **options):
        low, high = _port_range(ssh_ports)
        known = Host.objects.filter(name=name).first()
        if options["published_ports"]:
            published = _port_range(options["published_ports"], "--published-ports", "23000-23999")
        elif known is not None:  # an update keeps the host's range (its ports stay valid)
            published = (known.published_port_min, known.published_port_max)
        else:  # the 1000 ports after the SSH range (or before it, near the top)
            published = (high + 1, high + 1000) if high + 1000 <= 65535 else (low - 1000, low - 1)
        fields = {
            "vcpus": options["vcpus"],
            "memory_mib": options["memory_mib"],
            "disk_gib": options["disk_gib"],
            "storage_dir": storage_dir,
            "ssh_port_min": low,
            "ssh_port_max": high,
            "published_port_min": published[0],
            "published_port_max": published[1],
            "virt_type": options["virt_type"],
            "console_ssh": options["console_ssh"],
            "console_ssh_host_key": options["console_ssh_host_key"],
        }
        probe = Host(name=name, uri=uri, **fields)
        try:
            probe.full_clean(validate_unique=False)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        images = list(Image.objects.order_by("name").values_list("path", flat=True))
        try:
            found = driver_at(uri, host_name=name).host_check(
                storage_dir=storage_dir, base_images=images
            )
        except HypervisorError as error:
            raise CommandError(f"Host {name} cannot hold VMs: {error}") from None
        self.stdout.write(f"{name}: libvirt {found.pop('libvirt')} answers at {uri}")
        self.stdout.write(f"  storage directory {storage_dir}: ready")
        for path, state in found.items():
            self.stdout.write(f"  base image {path}: {state}")
        if fields["console_ssh"]:
            try:
                route = SshRoute.parse(fields["console_ssh"], fields["console_ssh_host_key"])
                tunnel.check(route)
            except (ValueError, OSError) as error:
                raise CommandError(
                    f"Host {name}'s console channel does not work: {error}"
                ) from None
            self.stdout.write(
                f"  consoles: through SSH to {fields['console_ssh']} (host key pinned)"
            )
        else:
            self.stdout.write(
                "  consoles: from this web host's own VNC sockets (no --console-ssh; "
                "docs/deploy.md, 'Consoles of VMs on other hosts')"
            )
        try:
            host = host_register(name=name, uri=uri, **fields)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        self.stdout.write(f"Registered host {host.name}; its worker serves host.{host.name}.")
