"""A class that starts at once: 20 groups approved together, and 20 stopped VMs started
together, with the Procfile's real worker.

    .venv/bin/python bench/class.py [--groups 20] [--memory 512] [--concurrency 2[,4,...]]
                                    [--no-ssh] [--no-restart] [--restart-ssh]

Real libvirt (qemu:///system, TCG here) with the project's base image; a throwaway SQLite
database shared with a real `celery worker` started from the Procfile's `worker` line (its
host name, and only its host's queue: the bench never takes tasks from another process's
`default` queue), with `--concurrency` replaced by each value given. For each value:

1. N pending groups (one student each, a key of their own) are approved through the
   admin's bulk action (the instructor's POST of the changelist form, as in the browser);
   it prints the POST's time, then the time from the POST until every VM is running (the
   provision operations finished, libvirt says running) and, unless --no-ssh, until every
   VM answers SSH with its own group's key;
2. unless --no-restart or --no-ssh, every VM is stopped through the overview's bulk form,
   then started through it, and the time until every VM runs is printed (with
   --restart-ssh, also until every VM answers SSH again).

Everything stays on 127.0.0.1 (SSH forwards on loopback); every domain, disk and pool the
bench made is removed at the end, also when it fails.
"""

import argparse
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from clock import ssh_argv  # noqa: E402  (bench/clock.py)
from provision import forget_pool, virsh  # noqa: E402  (bench/provision.py)

SSH_TIMEOUT = 1800  # 20 TCG guests booting on 2 cores: minutes, not seconds


def worker_argv(host: str, concurrency: int) -> list[str]:
    """The Procfile's worker line for this host, with the given concurrency and the host's
    queue only."""
    line = next(
        row.split(":", 1)[1]
        for row in (ROOT / "Procfile").read_text().splitlines()
        if row.startswith("worker:")
    )
    line = line.replace("${STRATUS_LOCAL_HOST:-local}", host)
    argv = shlex.split(line)
    argv[argv.index("--concurrency") + 1] = str(concurrency)
    argv[argv.index("-Q") + 1] = f"host.{host}"
    argv[0] = str(ROOT / argv[0])
    return argv


class Worker:
    def __init__(self, argv: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "LOG_LEVEL": "INFO"},  # the driver logs its timings at INFO
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--concurrency", default="2", help="worker concurrency, e.g. 1,2,4")
    parser.add_argument("--no-ssh", action="store_true", help="stop at 'running'")
    parser.add_argument("--no-restart", action="store_true", help="skip the bulk start")
    parser.add_argument(
        "--restart-ssh", action="store_true", help="wait for SSH after the bulk start too"
    )
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
            CHANNEL_LAYER_PREFIX=f"stratus-bench{run}",
            LOG_LEVEL="WARNING",
        )
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        try:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                bench(args, concurrency, run, Path(args.image), storage, Path(tmp))
                clean(storage)
        finally:
            clean(storage)
            forget_pool(storage)
            shutil.rmtree(storage, ignore_errors=True)


def clean(storage: Path) -> None:
    prefix = os.environ["STRATUS_DOMAIN_PREFIX"]
    for name in virsh("list", "--all", "--name").split():
        if name.startswith(prefix):
            virsh("destroy", name)
            virsh("undefine", name, "--snapshots-metadata", "--managed-save")
    for leftover in storage.glob(f"{prefix}*"):
        leftover.unlink(missing_ok=True)


def bench(args, concurrency: int, run: str, image_path: Path, storage: Path, tmp: Path) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from labs.choices import ObservedState
    from labs.models import Course, Group, Host, Image, Membership, VmTemplate
    from labs.people.groups import group_register

    User = get_user_model()
    slug = f"class-c{concurrency}"
    course = Course.objects.create(slug=slug, title="A class", max_group_size=1)
    image = Image.objects.create(name=f"deb-{slug}", os="Debian 12", path=str(image_path))
    VmTemplate.objects.create(
        course=course, image=image, memory_mib=args.memory, disk_gib=4, quota_memory_mib=65536
    )
    host = Host.objects.create(
        name=f"bench{run}c{concurrency}", uri="qemu:///system", vcpus=64, memory_mib=65536,
        disk_gib=1000, virt_type="qemu", storage_dir=str(storage),
        ssh_port_min=25000, ssh_port_max=25999,
    )  # fmt: skip
    instructor = User.objects.create_user(
        f"teacher-{slug}", is_staff=True, is_superuser=True, password=secrets.token_urlsafe()
    )
    keys: dict[int, Path] = {}
    for i in range(args.groups):
        student = User.objects.create_user(f"{slug}-s{i}")
        Membership.objects.create(course=course, user=student)
        key = tmp / f"{slug}-k{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        public = key.with_suffix(".pub").read_text()
        group = group_register(
            course=course, by=student, name=f"g{i:02d}", member_usernames=[],
            project_title="t", project_idea="i", ssh_public_key=public,
        )  # fmt: skip
        keys[group.pk] = key

    # Kept after the run (the worker's own timings: "provisioned … in N s").
    log = Path(tempfile.gettempdir()) / f"stratus-bench-class-{run}-c{concurrency}.log"
    worker = Worker(worker_argv(host.name, concurrency), log)
    print(f"\n{args.groups} groups, {args.memory} MiB VMs, worker --concurrency {concurrency}")
    try:
        client = Client(SERVER_NAME="127.0.0.1")
        client.force_login(instructor)
        started = time.monotonic()
        answer = client.post(
            reverse("admin:labs_group_changelist"),
            {"action": "approve", "index": "0", "_selected_action": list(keys)},
        )
        posted = time.monotonic() - started
        if answer.status_code != 302:
            raise SystemExit(f"the approval answered {answer.status_code}")
        if Group.objects.filter(course=course, status="approved").count() != args.groups:
            raise SystemExit("the bulk approval did not approve every group")
        print(f"approval (admin bulk action, {args.groups} groups): POST {posted:.2f} s")
        report(course, keys, started, args, "after the approval")

        if args.no_restart or args.no_ssh:
            return
        overview = reverse("labs:course_bulk", args=[slug])
        # Stopped the way a class ends (an ACPI shutdown each; force off is not a bulk
        # action), once every guest has booted (SSH answered), so that each one obeys.
        answer = client.post(overview, {"kind": "stop", "scope": "all"})
        if answer.status_code != 302:
            raise SystemExit(f"the bulk stop answered {answer.status_code}")
        wait_all(course, ObservedState.SHUTOFF, time.monotonic(), "stopped")
        started = time.monotonic()
        answer = client.post(overview, {"kind": "start", "scope": "all"})
        if answer.status_code != 302:
            raise SystemExit(f"the bulk start answered {answer.status_code}")
        print(f"bulk start (overview, {args.groups} stopped VMs): POST "
              f"{time.monotonic() - started:.2f} s")  # fmt: skip
        report(course, keys, started, args, "after the bulk start", ssh=args.restart_ssh)
    finally:
        worked = log.read_bytes()  # not what its own shutdown says
        worker.stop()
        failed = re.findall(rb"(?m)^.*(?:ERROR|Traceback).*$", worked)
        if failed:
            print(f"the worker logged {len(failed)} error line(s); first: {failed[0][:200]!r}")
        took = [float(t) for t in re.findall(rb"provisioned \S+ on \S+ in ([0-9.]+) s", worked)]
        if took:
            print(
                f"  the driver's part of a provision (overlay, seed, define, start): median "
                f"{sorted(took)[len(took) // 2]:.2f} s, at most {max(took):.2f} s; log: {log}"
            )


def wait_all(course, state: str, started: float, what: str, timeout: float = 600) -> float:
    from labs.models import Vm

    while time.monotonic() - started < timeout:
        states = Vm.objects.filter(group__course=course).values_list("observed_state", flat=True)
        if states and all(s == state for s in states):
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit(f"not every VM {what} after {timeout:.0f} s: {sorted(states)}")


def report(
    course, keys: dict[int, Path], started: float, args, when: str, *, ssh: bool = True
) -> None:
    from labs.choices import ObservedState
    from labs.models import Operation, Vm

    running = wait_all(course, ObservedState.RUNNING, started, "running")
    # This phase's operations (one per VM), once each has finished.
    ops = Operation.objects.filter(vm__group__course=course).order_by("-created_at")
    while True:
        latest = list(ops[: len(keys)])
        if all(op.finished_at for op in latest):
            break
        time.sleep(0.1)
    waits = sorted((op.started_at - op.created_at).total_seconds() for op in latest)
    took = sorted((op.finished_at - op.started_at).total_seconds() for op in latest)
    print(
        f"  every VM running {running:.1f} s {when} (the last operation waited "
        f"{waits[-1]:.1f} s in the queue before a worker slot took it; an operation took "
        f"median {took[len(took) // 2]:.2f} s, at most {took[-1]:.2f} s)"
    )
    if args.no_ssh or not ssh:
        return
    vms = {vm.ssh_port: keys[vm.group_id] for vm in Vm.objects.filter(group__course=course)}
    ready: dict[int, float] = {}

    def ping(port: int) -> None:
        try:  # a guest still booting may take the connection and answer nothing for long
            argv = ssh_argv(vms[port], port, "true")
            done = subprocess.run(argv, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            return
        if done.returncode == 0:
            ready[port] = time.monotonic() - started

    said = 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        while len(ready) < len(vms):
            if time.monotonic() - started > SSH_TIMEOUT:
                raise SystemExit(f"{len(vms) - len(ready)} VMs without SSH after {SSH_TIMEOUT} s")
            list(pool.map(ping, [p for p in vms if p not in ready]))
            # A quarter at a time, so that a run cut short still tells how far it got.
            while said < 3 and len(ready) >= len(vms) * (said + 1) / 4:
                said += 1
                latest = max(ready.values())
                print(f"    {len(ready)} of {len(vms)} answer SSH {latest:.0f} s {when}")
            time.sleep(1)
    times = sorted(ready.values())
    print(
        f"  every VM answers SSH with its group's key {times[-1]:.1f} s {when} "
        f"(first {times[0]:.1f} s, median {times[len(times) // 2]:.1f} s)"
    )


if __name__ == "__main__":
    main()
