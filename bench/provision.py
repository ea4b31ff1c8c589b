"""Time from approval to a running domain, for 1 VM and for N VMs in a row on one host.

    .venv/bin/python bench/provision.py [N] [--image PATH]

Real libvirt (qemu:///system, TCG) with the project's base image; a throwaway SQLite
database; the worker's code path run in this process (claim → overlay → seed → define →
start), so the figure is Stratus' own cost, excluding guest boot. Guests get 256 MiB and
their own storage directory, and every VM is deleted at the end.

Each guest is forced off once it is measured, so the next measurement does not compete
with up to 20 TCG guests booting on the same cores; --keep-running leaves them running
(the figure then includes that contention).
"""

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=20)
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument(
        "--image",
        default=str(
            Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images"))
            / "debian-12.qcow2"
        ),
    )
    args = parser.parse_args()
    run = secrets.token_hex(3)
    storage = Path(f"/var/lib/stratus/bench-{run}")
    storage.mkdir(parents=True, mode=0o755)
    with tempfile.TemporaryDirectory(prefix="stratus-bench-") as tmp:
        os.environ.pop("DATABASE_URL", None)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="portal.settings",
            SQLITE_PATH=str(Path(tmp) / "bench.sqlite3"),
            EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
            STRATUS_DOMAIN_PREFIX=f"stratus-bench{run}-vm-",
            LOG_LEVEL="WARNING",
        )
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        try:
            bench(args.n, Path(args.image), storage, tmp, keep_running=args.keep_running)
        finally:
            forget_pool(storage)
            shutil.rmtree(storage, ignore_errors=True)


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True
    ).stdout


def forget_pool(path: Path) -> None:
    """The adapter made a libvirt pool for the bench's storage directory: remove it."""
    for pool in virsh("pool-list", "--all", "--name").split():
        if f"<path>{path}</path>" in virsh("pool-dumpxml", pool):
            virsh("pool-destroy", pool)
            virsh("pool-undefine", pool)


def bench(n: int, image_path: Path, storage: Path, tmp: str, *, keep_running: bool) -> None:
    from django.contrib.auth import get_user_model

    from labs.compute import requests, runner
    from labs.models import Course, Host, Image, Membership, Operation, Vm, VmTemplate
    from labs.people.groups import group_approve, group_register

    User = get_user_model()
    course = Course.objects.create(slug="bench", title="Bench", max_group_size=1)
    image = Image.objects.create(name="deb", os="Debian 12", path=str(image_path))
    VmTemplate.objects.create(course=course, image=image, memory_mib=256, disk_gib=4)
    Host.objects.create(
        name="bench",
        uri="qemu:///system",
        vcpus=64,
        memory_mib=65536,
        disk_gib=1000,
        virt_type="qemu",
        storage_dir=str(storage),
        ssh_port_min=25000,
        ssh_port_max=25999,
    )
    staff = User.objects.create_user("staff", is_superuser=True)
    vm_ids, seconds = [], []
    try:
        for i in range(n + 1):
            student = User.objects.create_user(f"s{i}")
            Membership.objects.create(course=course, user=student)
            # Every group needs its own key (one fingerprint per course).
            k = Path(tmp) / f"k{i}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True
            )
            group = group_register(
                course=course,
                by=student,
                name=f"g{i}",
                member_usernames=[],
                project_title="t",
                project_idea="i",
                ssh_public_key=k.with_suffix(".pub").read_text(),
            )
            started = time.perf_counter()
            group_approve(group=group, by=staff)
            op = Operation.objects.get(vm__group=group, kind="provision")
            outcome = runner.operation_run(operation_id=op.pk, worker="bench/1", may_retry=False)
            elapsed = time.perf_counter() - started
            vm_ids.append(op.vm_id)
            if outcome.status != "succeeded":
                raise SystemExit(f"provision failed: {outcome.error}")
            seconds.append(elapsed)
            if not keep_running:
                stop = requests.vm_operation_request(vm=op.vm, kind="force_off", by=staff)
                runner.operation_run(operation_id=stop.pk, worker="bench/1", may_retry=False)
            label = "first VM (cold connection, pool)" if i == 0 else f"VM {i:2d}"
            print(f"{label:34s} approval → running {elapsed * 1000:7.0f} ms")
    finally:
        for vm_id in vm_ids:
            op = requests.vm_operation_request(
                vm=Vm.objects.get(pk=vm_id), kind="delete", by=staff
            )
            runner.operation_run(operation_id=op.pk, worker="bench/1", may_retry=False)
    rest = seconds[1:]
    print(f"\n1 VM (the first):  {seconds[0]:.2f} s")
    if rest:
        print(
            f"{len(rest)} VMs in a row: total {sum(rest):.2f} s, "
            f"median {statistics.median(rest):.2f} s, max {max(rest):.2f} s per VM"
        )


if __name__ == "__main__":
    main()
