"""What the course clock costs on real guests: suspend to disk and back, the deadline's
final snapshots across a course, the end of term's archive.

    .venv/bin/python bench/clock.py [--groups 20] [--rounds 3] [--memory 1024]

Real libvirt (qemu:///system, TCG here) with the project's base image; a throwaway SQLite
database; the worker's code path run in this process, one operation at a time (as one
worker slot runs them). It prints:

- for one guest of --memory MiB, booted to SSH: the managed save and the restore (the
  SAVE and RESUME operations, started → finished) over --rounds rounds, the size of the
  save file, and that a file in /dev/shm survived;
- the deadline of a course of --groups groups, one 256 MiB VM each, shut off (their final
  snapshots are disk-only): from the tick that asks until every VM has its final snapshot,
  and per VM; then the same guest's final snapshot while it runs (with its memory);
- the end of term's archive of the one guest (shut down, flatten + compress, delete): the
  time and the archive's size, and restore_archive's time until SSH answers again.

Loopback only; every domain, disk, pool and archive it made is removed at the end, also
when it fails.
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
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from provision import forget_pool, virsh  # noqa: E402  (bench/provision.py)


def ssh_argv(key: Path, port: int, command: str) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR", "student@127.0.0.1", command,
    ]  # fmt: skip


def wait_ssh(key: Path, port: int, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        done = subprocess.run(ssh_argv(key, port, "true"), capture_output=True, timeout=30)
        if done.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"no SSH on port {port} after {timeout:.0f} s")


def guest(key: Path, port: int, command: str) -> str:
    done = subprocess.run(ssh_argv(key, port, command), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"in the guest, {command!r} failed: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=1024)
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
    archive = Path(f"/var/lib/stratus/bench-{run}-archive")
    with tempfile.TemporaryDirectory(prefix="stratus-bench-") as tmp:
        os.environ.pop("DATABASE_URL", None)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="portal.settings",
            SQLITE_PATH=str(Path(tmp) / "bench.sqlite3"),
            EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
            STRATUS_DOMAIN_PREFIX=f"stratus-bench{run}-vm-",
            STRATUS_ARCHIVE_DIR=str(archive),
            LOG_LEVEL="WARNING",
        )
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        try:
            bench(args, Path(args.image), storage, Path(tmp))
        finally:
            prefix = os.environ["STRATUS_DOMAIN_PREFIX"]
            for name in virsh("list", "--all", "--name").split():
                if name.startswith(prefix):
                    virsh("destroy", name)
                    virsh("undefine", name, "--snapshots-metadata", "--managed-save")
            forget_pool(storage)
            shutil.rmtree(storage, ignore_errors=True)
            shutil.rmtree(archive, ignore_errors=True)


def bench(args, image_path: Path, storage: Path, tmp: Path) -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.utils import timezone

    from labs.compute import requests, runner, term
    from labs.models import Course, Host, Image, Membership, Operation, Vm, VmArchive, VmTemplate
    from labs.people.groups import group_approve, group_register

    User = get_user_model()
    course = Course.objects.create(slug="bench", title="Bench", max_group_size=1)
    image = Image.objects.create(name="deb", os="Debian 12", path=str(image_path))
    template = VmTemplate.objects.create(
        course=course, image=image, memory_mib=args.memory, disk_gib=4, quota_memory_mib=65536
    )
    Host.objects.create(
        name="bench", uri="qemu:///system", vcpus=64, memory_mib=65536, disk_gib=1000,
        virt_type="qemu", storage_dir=str(storage), ssh_port_min=25000, ssh_port_max=25999,
    )  # fmt: skip
    staff = User.objects.create_user("staff", is_superuser=True)

    def run(op: Operation) -> float:
        outcome = runner.operation_run(operation_id=op.pk, worker="bench/1", may_retry=False)
        op.refresh_from_db()
        if outcome.status != "succeeded":
            raise SystemExit(f"{op.kind} of {op.vm} failed: {op.error}")
        return (op.finished_at - op.started_at).total_seconds()

    def group_with_vm(i: int) -> tuple[Vm, Path]:
        student = User.objects.create_user(f"s{i}")
        Membership.objects.create(course=course, user=student)
        key = tmp / f"k{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        public = key.with_suffix(".pub").read_text()
        group = group_register(
            course=course, by=student, name=f"g{i:02d}", member_usernames=[],
            project_title="t", project_idea="i", ssh_public_key=public,
        )  # fmt: skip
        group_approve(group=group, by=staff)
        run(Operation.objects.get(vm__group=group, kind="provision"))
        return Vm.objects.get(group=group), key

    # 1. Suspend to disk and back, one guest of --memory MiB.
    vm, key = group_with_vm(0)
    port = vm.ssh_port
    print(f"guest of {args.memory} MiB booted to SSH in {wait_ssh(key, port):.1f} s")
    token = secrets.token_hex(8)
    guest(key, port, f"echo {token} > /dev/shm/bench-proof")
    saves, restores = [], []
    for _ in range(args.rounds):
        saves.append(run(requests.vm_operation_request(vm=vm, kind="save", by=staff)))
        save_file = Path(f"/var/lib/libvirt/qemu/save/{vm.domain_name}.save")
        size = save_file.stat().st_size if save_file.exists() else 0
        restores.append(run(requests.vm_operation_request(vm=vm, kind="resume", by=staff)))
        wait_ssh(key, port)
    survived = guest(key, port, "cat /dev/shm/bench-proof").strip() == token
    print(
        f"suspend to disk: median {statistics.median(saves):.2f} s "
        f"({', '.join(f'{s:.2f}' for s in saves)}); save file {size / 2**20:.0f} MiB\n"
        f"resume from disk: median {statistics.median(restores):.2f} s "
        f"({', '.join(f'{s:.2f}' for s in restores)}); /dev/shm file kept: {survived}"
    )

    # 2. The deadline across a course: --groups more groups, 256 MiB VMs, shut off.
    VmTemplate.objects.filter(pk=template.pk).update(memory_mib=256)
    others = []
    for i in range(1, args.groups + 1):
        other, _ = group_with_vm(i)
        run(requests.vm_operation_request(vm=other, kind="force_off", by=staff))
        others.append(other)
    # The one guest keeps running: its final snapshot takes its memory too.
    Course.objects.filter(pk=course.pk).update(deadline_at=timezone.now() - timedelta(minutes=1))
    started = time.monotonic()
    asked = term.deadline_tick(Course.objects.get(pk=course.pk), now=timezone.now())
    per_vm = {op.vm_id: run(op) for op in asked}
    total = time.monotonic() - started
    stopped = [per_vm[o.pk] for o in others if o.pk in per_vm]
    print(
        f"deadline, {len(asked)} VMs ({len(others)} shut off, 1 running): every final snapshot "
        f"in {total:.1f} s with one worker slot; shut off: median {statistics.median(stopped):.2f}"
        f" s per VM; the running {args.memory} MiB guest (with memory): {per_vm[vm.pk]:.2f} s"
    )
    for other in others:
        run(requests.vm_operation_request(vm=other, kind="delete", by=staff))

    # 3. The end of term's archive of the one guest, and its restore.
    Course.objects.filter(pk=course.pk).update(term_ends_at=timezone.now() - timedelta(minutes=1))
    [archive_op] = term.archive_tick(Course.objects.get(pk=course.pk), now=timezone.now())
    seconds = run(archive_op)
    made = VmArchive.objects.get(vm=vm)
    print(
        f"archive (shut down, flatten + compress, delete): {seconds:.1f} s, "
        f"{made.size_bytes / 2**20:.0f} MiB for a {vm.disk_gib} GiB disk"
    )
    started = time.monotonic()
    call_command("restore_archive", str(made.pk), verbosity=0)
    restored = time.monotonic() - started
    port = Vm.objects.get(pk=vm.pk).ssh_port
    print(f"restore_archive: {restored:.1f} s; SSH answers {wait_ssh(key, port):.1f} s later")
    run(requests.vm_operation_request(vm=Vm.objects.get(pk=vm.pk), kind="delete", by=staff))


if __name__ == "__main__":
    main()
