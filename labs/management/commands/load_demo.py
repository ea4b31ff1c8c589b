import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.urls import NoReverseMatch, reverse

from labs.choices import ObservedState
from labs.tooling.demo import Demo, demo_load


class Command(BaseCommand):
    help = (
        "Create or refresh the demo course (and, given a base image, this machine as its "
        "host and an approved demo group whose VM the worker boots) and print the logins: "
        "new passwords each time. Running it again creates no second group or VM."
    )

    def add_arguments(self, parser):
        parser.add_argument("--image", type=Path, help="base image for the demo's VMs")
        parser.add_argument(
            "--key",
            type=Path,
            default=settings.BASE_DIR / "var" / "demo_key",
            help="where the demo group's private SSH key is kept (default: var/demo_key)",
        )

    def handle(self, *args, image, key, **options):
        demo = demo_load(image_path=image, key_path=key)
        self.print_summary(demo)

    def print_summary(self, demo: Demo) -> None:
        site, course, out = settings.SITE_URL, demo.course, self.stdout.write
        out("")
        out(f"Demo course {course.slug!r}: {course.title}")
        if hasattr(course, "vm_template"):
            out(f"Approved groups get a VM from {course.vm_template.image.path} on this machine.")
        out(f"Open {site}/ and sign in as one of:")
        for login in demo.logins:
            out(f"  {login.username:<12} {login.password:<16} ({login.role})")
        group = demo.group
        for note in group.notes:
            out(self.style.WARNING(note))
        if group.group is not None:
            members = ", ".join(
                m.user.username
                for m in group.group.memberships.select_related("user").order_by("user__username")
            )
            vm_names = ", ".join(vm.name for vm in group.vms) or "no VM"
            running = any(vm.observed_state == ObservedState.RUNNING for vm in group.vms)
            if group.created:
                state = "is approved (just now); the worker provisions its VM when it starts"
            elif running:
                state = "is approved and its VM was running when the site last looked"
            else:
                state = "is approved; the worker picks up whatever is still to do"
            out(f"“{group.group.name}” ({members}) {state} ({vm_names}).")
            out("")
            out("What to do next:")
            out(f"  1. Open {site}/ and sign in as alice.")
            page = f"  2. Open the group page ({site}/groups/{group.group.pk}/): "
            if running:
                out(page + "the VM is running.")
            else:
                out(page + "the VM shows Running within seconds of the worker starting, live.")
            out(
                "  3. Press Console: the VM's screen in the browser; it boots to its login: "
                "prompt in about a minute."
            )
            for vm in group.vms:
                if vm.ssh_port and vm.host is not None:
                    key = _shown_path(group.key_path) if group.key_path else "KEY"
                    out(
                        f"  4. Or SSH in: ssh -i {key} -p {vm.ssh_port} "
                        f"{vm.image.login_user}@{vm.host.ssh_address}"
                    )
        out(f"Instructors review groups at {site}/admin/")
        try:
            overview = reverse("labs:course_overview", kwargs={"slug": course.slug})
        except NoReverseMatch:
            overview = None
        if overview:
            out(f"and see every group and VM of the course at {site}{overview}")


def _shown_path(path: Path) -> str:
    """The path relative to the current directory when it is below it (var/demo_key)."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)
