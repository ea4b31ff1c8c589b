"""A few minutes of real guests, simulated users and faults at random; then the books.

    .venv/bin/python bench/chaos.py [--groups 2] [--seconds 180] [--libvirtd]

Real parts on loopback only: a private Redis on a free 127.0.0.1 port is the Celery
broker, a real worker process serves this run's host queue on the machine's libvirt
(qemu:///system, TCG), and the guests boot from the project's base image (256 MiB each).
Simulated users ask every few seconds for a snapshot, reboot, shut-down, start, suspend,
resume or reset of a random VM (what its state accepts); at random the bench SIGKILLs the
worker (restarted 2 s later), kills Redis without persistence (restarted 3 s later) and,
with --libvirtd, restarts libvirtd (scripts/restart-libvirtd.sh: the machine's own,
so only on a machine of your own). This process plays beat: the outbox's sweeper every
2 s, reconcile every 30 s.

Then it stops the faults, waits (bounded) for every operation to end and prints:
operations requested / succeeded / failed with a message / stuck (the goal: zero), the
longest an operation waited before a worker started it, and the consistency check: every
VM's row against libvirt, one domain per VM, no file that belongs to nothing. Everything
it made is removed at the end; it ends only the processes it started, by PID.
"""

import argparse
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("snapshot", "reboot", "stop", "start", "suspend", "resume", "reset")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True
    ).stdout


class Proc:
    """A process of ours, restartable; ended by its PID (its own session)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log, self.proc = argv, env, log, None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--libvirtd", action="store_true", help="also restart libvirtd")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--image",
        default=str(Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images"))
                    / "debian-12.qcow2"),
    )  # fmt: skip
    args = parser.parse_args()
    random.seed(args.seed)
    run = secrets.token_hex(3)
    storage = Path(f"/var/lib/stratus/chaos-{run}")
    storage.mkdir(parents=True, mode=0o755)
    port = free_port()
    prefix = f"stratus-chaos{run}-vm-"
    with tempfile.TemporaryDirectory(prefix="stratus-chaos-") as tmp:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "SQLITE_PATH": str(Path(tmp) / "chaos.sqlite3"),
            "DATABASE_URL": "",
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "STRATUS_DOMAIN_PREFIX": prefix,
            "CHANNEL_LAYER_PREFIX": f"stratus-chaos{run}",
            "LOG_LEVEL": "WARNING",
            "VM_SHUTDOWN_TIMEOUT": "10",
        }
        os.environ.update(env)
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        redis = Proc(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], env, Path(tmp) / "redis.log",
        )  # fmt: skip
        host = f"chaos{run}"
        worker = Proc(
            [sys.executable, "-m", "celery", "-A", "portal", "worker", "-P", "prefork", "-c",
             "1", "-Q", f"host.{host}", "-n", f"{host}@localhost", "--without-gossip",
             "--without-mingle", "--loglevel", "WARNING"], env, Path(tmp) / "worker.log",
        )  # fmt: skip
        redis.start()
        time.sleep(0.5)
        worker.start()
        try:
            chaos(args, host=host, storage=storage, redis=redis, worker=worker, prefix=prefix)
        finally:
            worker.kill()
            redis.kill()
            for name in virsh("list", "--all", "--name").split():
                if name.startswith(prefix):
                    virsh("destroy", name)
                    virsh("undefine", name, "--snapshots-metadata", "--managed-save")
            for pool in virsh("pool-list", "--all", "--name").split():
                if f"<path>{storage}</path>" in virsh("pool-dumpxml", pool):
                    virsh("pool-destroy", pool)
                    virsh("pool-undefine", pool)
            shutil.rmtree(storage, ignore_errors=True)


def chaos(args, *, host: str, storage: Path, redis: Proc, worker: Proc, prefix: str) -> None:
    from django.contrib.auth import get_user_model

    from labs.choices import ACTIVE_OPERATION_STATUSES, OperationStatus, Role
    from labs.compute import dispatch, kinds, reconcile
    from labs.compute.requests import vm_operation_request
    from labs.errors import StratusError
    from labs.models import Course, Host, Image, Membership, Operation, Vm, VmTemplate
    from labs.people.groups import group_approve, group_register

    User = get_user_model()
    course = Course.objects.create(slug="chaos", title="Chaos", max_group_size=1)
    image = Image.objects.create(name="deb", os="Debian 12", path=args.image)
    VmTemplate.objects.create(course=course, image=image, memory_mib=256, disk_gib=4)
    Host.objects.create(
        name=host, uri="qemu:///system", vcpus=64, memory_mib=64 * 1024, disk_gib=999,
        virt_type="qemu", storage_dir=str(storage), ssh_port_min=25000, ssh_port_max=25099,
    )  # fmt: skip
    staff = User.objects.create_user("staff", is_staff=True)
    Membership.objects.create(course=course, user=staff, role=Role.INSTRUCTOR)
    users = []
    for n in range(args.groups):
        user = User.objects.create_user(f"s{n}")
        Membership.objects.create(course=course, user=user)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{storage}/k{n}"], check=True
        )
        group = group_register(
            course=course, by=user, name=f"g{n}", member_usernames=[], project_title="t",
            project_idea="i", ssh_public_key=Path(f"{storage}/k{n}.pub").read_text(),
        )  # fmt: skip
        group_approve(group=group, by=staff)
        users.append(user)

    asked, refused, faults = Counter(), Counter(), Counter()
    started = time.monotonic()
    next_op, next_fault, next_sweep, next_reconcile = 5.0, 20.0, 0.0, 30.0
    while (now := time.monotonic() - started) < args.seconds:
        if now >= next_sweep:
            dispatch.operations_resend()
            next_sweep = now + 2
        if now >= next_reconcile:
            try:
                reconcile.reconcile_all()
            except Exception as error:  # libvirtd restarting: the next pass goes on
                print(f"  reconcile: {type(error).__name__}")
            next_reconcile = now + 30
        if now >= next_op:
            vm = random.choice(list(Vm.objects.live().exclude(observed_state="new")) or [None])
            if vm is not None:
                kind = random.choice(
                    [k for k in KINDS if vm.observed_state in kinds.CATALOGUE[k].accepts]
                    or ["start"]
                )
                try:
                    member = users[int(vm.group.name[1:])]  # the group's own student
                    vm_operation_request(vm=vm, kind=kind, by=member)
                    asked[kind] += 1
                except StratusError as error:
                    refused[type(error).__name__] += 1
            next_op = now + random.uniform(2, 5)
        if now >= next_fault:
            fault = random.choice(["worker", "redis"] + (["libvirtd"] if args.libvirtd else []))
            faults[fault] += 1
            print(f"  {now:6.1f} s  fault: {fault}")
            if fault == "worker":
                worker.kill()
                time.sleep(2)
                worker.start()
            elif fault == "redis":
                redis.kill()
                time.sleep(3)
                redis.start()
            else:
                subprocess.run([str(ROOT / "scripts" / "restart-libvirtd.sh")], check=False)
            next_fault = now + random.uniform(20, 40)
        time.sleep(0.2)

    # The faults stop; every operation must end.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if not Operation.objects.filter(status__in=ACTIVE_OPERATION_STATUSES).exists():
            break
        dispatch.operations_resend()
        time.sleep(2)
    reconcile.reconcile_all()

    ops = list(Operation.objects.all())
    ended = Counter(op.status for op in ops)
    waits = [(op.started_at - op.created_at).total_seconds() for op in ops if op.started_at]
    stuck = [op for op in ops if op.status in ACTIVE_OPERATION_STATUSES]
    failed = [op for op in ops if op.status == OperationStatus.FAILED]
    print(f"\n{args.seconds} s, {args.groups} guests, faults: {dict(faults)}")
    print(f"operations requested   {len(ops)} ({dict(asked)}; refused up front {dict(refused)})")
    print(f"  succeeded            {ended[OperationStatus.SUCCEEDED]}")
    print(f"  failed with message  {len(failed)}")
    for op in failed[:10]:
        print(f"    {op.kind}: {op.error[:120]}")
    print(f"  stuck                {len(stuck)}")
    print(f"longest wait before a worker started one: {max(waits, default=0):.1f} s")

    domains = {n for n in virsh("list", "--all", "--name").split() if n.startswith(prefix)}
    live = list(Vm.objects.live().exclude(observed_state="new"))
    states = {"running": "running", "shut off": "shutoff", "paused": "paused"}
    disagree = [
        f"{vm.name}: row {vm.observed_state}, libvirt {virsh('domstate', vm.domain_name).strip()}"
        for vm in live
        if states.get(virsh("domstate", vm.domain_name).strip()) != vm.observed_state
    ]
    expected_files = {f"{vm.domain_name}{s}" for vm in live for s in (".qcow2", "-seed.iso")}
    files = {p.name for p in storage.glob(f"{prefix}*")}
    print(f"consistency: {len(live)} VMs, {len(domains)} domains "
          f"({'one each' if domains == {vm.domain_name for vm in live} else 'MISMATCH'}), "
          f"rows vs libvirt: {disagree or 'agree'}, "
          f"orphaned files: {sorted(files - expected_files) or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
