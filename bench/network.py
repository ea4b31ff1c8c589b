"""A group's private network on real guests: round trip and throughput between its VMs on
one host and across two, and the time a firewall change takes to reach a peer.

    flock /tmp/stratus-heavy.lock .venv/bin/python bench/network.py [--pings 20]
                                  [--megabytes 32] [--rounds 3] [--memory 512]

Two test hosts, each a libvirtd in a network namespace of its own that the bench makes
(labs/tooling/netns_hosts.py, as the integration test), joined by a veth pair inside
them; a throwaway SQLite database and the Procfile's worker, one per host. One group with three
VMs: vm1 and vm3 on host A, vm2 on host B (the VXLAN between the two). It prints:

- round trips (ICMP from the guest, ``--pings`` probes): vm1 -> vm3 (one host: the
  bridge) and vm1 -> vm2 (across: VXLAN over the veth), min / median / max;
- throughput (TCP, Python in both guests: ``--megabytes`` MiB from vm1 to a sink that
  answers when it has them all, timed by the sender), to vm3 and to vm2;
- the firewall, ``--rounds`` times: from ``rule_add`` (tcp 5001 from the group) until
  vm1's new connection gets through to vm2, and from ``rule_remove`` until it does not
  (an upper bound: each probe is an SSH round trip into the guest), and each
  ``firewall_sync``'s own time on its host.

Volume attach and detach times are bench/volumes.py's; image capture per GiB is
bench/images.py's. Everything stays inside the two namespaces (the guests' SSH forwards
on their loopback); the guests, the libvirtds, the namespaces and the directories are
removed at the end, also when it fails.
"""

import argparse
import importlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# bench/class.py's worker: the Procfile's worker line on one host's queue.
procfile_worker = importlib.import_module("class")

UNDERLAY = {"a": "10.254.0.1", "b": "10.254.0.2"}
PORT = 5001
SSH_PORTS = {"a": 24800, "b": 24850}

# A TCP sink in the guest: takes one connection, reads it to the end, answers with the
# byte count (so that the sender's clock stops when everything has arrived).
SINK = (
    "import socket; s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    f"s.bind(('0.0.0.0', {PORT})); s.listen(1)\n"
    "while True:\n"
    "    c, _ = s.accept(); n = 0\n"
    "    while True:\n"
    "        b = c.recv(1 << 16)\n"
    "        if not b: break\n"
    "        n += len(b)\n"
    "    try:\n"
    "        c.sendall(str(n).encode())\n"
    "    except OSError:\n"
    "        pass  # a probe that only opened and closed\n"
    "    c.close()\n"
)
# The sender: MiB to the sink, the seconds until its answer.
SEND = (
    "import socket, sys, time; n = int(sys.argv[2]) << 20; chunk = bytes(1 << 16); "
    f"t = time.monotonic(); c = socket.create_connection((sys.argv[1], {PORT}), timeout=30)\n"
    "left = n\n"
    "while left > 0:\n"
    "    c.sendall(chunk[: min(left, len(chunk))]); left -= len(chunk)\n"
    "c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); s = time.monotonic() - t\n"
    "assert got == n, got\n"
    "print('%.3f' % s)\n"
)
REACH = "timeout 1.5 bash -c 'exec 3<>/dev/tcp/{}/{}' && echo open || echo closed"


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512, help="MiB per guest")
    args = parser.parse_args()
    run = secrets.token_hex(3)
    with tempfile.TemporaryDirectory(prefix="stratus-bench-") as tmp:
        os.environ.pop("DATABASE_URL", None)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="portal.settings",
            SQLITE_PATH=str(Path(tmp) / "bench.sqlite3"),
            EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
            STRATUS_DOMAIN_PREFIX=f"stratus-bench{run}-vm-",
            CHANNEL_LAYER_PREFIX=f"stratus-bench{run}",
            PAGE_CACHE_PREFIX=f"stratus-bench{run}:",
            LOG_LEVEL="WARNING",
        )
        import django

        django.setup()
        from django.core.management import call_command

        from labs.tooling.netns_hosts import NetnsHost, join

        call_command("migrate", verbosity=0)
        hosts = [NetnsHost(run, tag, os.environ["STRATUS_DOMAIN_PREFIX"]) for tag in "ab"]
        workers: list = []
        try:
            for host in hosts:
                host.start()
            join(hosts, UNDERLAY, run)
            bench(args, run, hosts, workers, Path(tmp))
        finally:
            for w in workers:
                w.stop()
            for host in hosts:
                host.stop()


def bench(args, run: str, netns: list, workers: list, tmp: Path) -> None:
    from django.contrib.auth import get_user_model

    from labs.choices import ACTIVE_OPERATION_STATUSES, OperationKind, Role
    from labs.compute import firewall, requests
    from labs.models import Course, Host, Image, Membership, Operation, Vm, VmTemplate
    from labs.people.groups import group_approve, group_register
    from labs.tooling.netns_hosts import GUEST_PING

    image = Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images"))
    image = image / "debian-12.qcow2"
    course = Course.objects.create(slug="bench-net", title="Networks", term="Bench")
    users = get_user_model().objects
    student = users.create_user(username="s1", password=None)
    teacher = users.create_user(username="t1", password=None, is_staff=True)
    Membership.objects.create(course=course, user=student, role=Role.STUDENT)
    Membership.objects.create(course=course, user=teacher, role=Role.INSTRUCTOR)
    rows = {}
    for ns in netns:
        rows[ns.tag] = Host.objects.create(
            name=f"bn{run}{ns.tag}", uri=ns.uri, vcpus=4, memory_mib=8192, disk_gib=100,
            virt_type="qemu", network_mode="user", ssh_port_min=SSH_PORTS[ns.tag],
            ssh_port_max=SSH_PORTS[ns.tag] + 9, storage_dir=str(ns.storage),
            group_networks=True, tunnel_address=UNDERLAY[ns.tag], netns=ns.netns,
        )  # fmt: skip
    base = Image.objects.create(
        name="debian-12", os="Debian 12", login_user="student", path=str(image), size_gib=2
    )
    VmTemplate.objects.create(
        course=course, image=base, count=1, vcpus=1, memory_mib=args.memory, disk_gib=4,
        quota_vms=3, quota_vcpus=3, quota_memory_mib=3 * args.memory, quota_disk_gib=12,
    )  # fmt: skip
    for ns in netns:
        argv = procfile_worker.worker_argv(rows[ns.tag].name, 1)
        workers.append(procfile_worker.Worker(argv, tmp / f"worker-{ns.tag}.log"))
    key = tmp / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def only(tag: str) -> None:  # placement takes the one enabled host
        for t, row in rows.items():
            Host.objects.filter(pk=row.pk).update(enabled=t == tag)

    only("a")
    group = group_register(
        course=course, by=student, name="Net", member_usernames=[], project_title="t",
        project_idea="i", ssh_public_key=key.with_suffix(".pub").read_text(),
    )  # fmt: skip
    group_approve(group=group, by=teacher)
    group.refresh_from_db()  # approved: its members may change its firewall
    only("b")
    requests.vm_create(group=group, by=student)
    only("a")
    requests.vm_create(group=group, by=student)
    for row in rows.values():
        Host.objects.filter(pk=row.pk).update(enabled=True)
    started = time.monotonic()
    provisions = Operation.objects.filter(kind=OperationKind.PROVISION, vm__group=group)

    def provisioned():
        states = set(provisions.values_list("status", flat=True))
        if "failed" in states:
            raise SystemExit("a provision failed: " + str(provisions.values_list("error")))
        return states == {"succeeded"}

    wait(provisioned, 300, "the three provisions")
    vms = {vm.name: vm for vm in Vm.objects.filter(group=group).select_related("host")}
    ns_of = {rows[ns.tag].pk: ns for ns in netns}
    on = {name: ns_of[vm.host_id] for name, vm in vms.items()}
    for name, vm in vms.items():
        on[name].wait_for_ssh(key, vm.ssh_port, timeout=600)
    print(f"three guests ({args.memory} MiB) up and answering SSH in "
          f"{time.monotonic() - started:.0f} s; vm1, vm3 on A, vm2 on B")  # fmt: skip

    def guest(name: str, command: str, **kw):
        return on[name].ssh(key, vms[name].ssh_port, command, **kw)

    # Round trips.
    print(f"\nround trip, ICMP from vm1, {args.pings} probes (min / median / max, ms)")
    for target, where in (("vm3", "one host (the bridge)"), ("vm2", "across (VXLAN)")):
        said = guest("vm1", f"sudo python3 - {target} '' {args.pings}", input=GUEST_PING,
                     timeout=120)  # fmt: skip
        rtts = [float(x) for x in said.stdout.split()[1:]]
        if not rtts:
            raise SystemExit(f"no answer from {target}: {said.stdout}{said.stderr}")
        print(f"  vm1 -> {target}, {where}: {spread(rtts)} ({len(rtts)} answered)")

    # The firewall: tcp 5001 from the group opened and closed, timed to a peer's connection.
    for name in ("vm2", "vm3"):
        guest(name, "cat > /tmp/sink.py; setsid nohup python3 /tmp/sink.py >/dev/null "
                    "2>&1 < /dev/null &", input=SINK)  # fmt: skip
        wait(lambda n=name: guest(n, REACH.format("127.0.0.1", PORT)).stdout.strip() == "open",
             30, f"{name}'s sink")  # fmt: skip

    def reaches() -> bool:
        return guest("vm1", REACH.format("vm2", PORT)).stdout.strip() == "open"

    def settled():
        busy = Operation.objects.filter(vm__group=group, status__in=ACTIVE_OPERATION_STATUSES)
        return not busy.exists()

    if reaches():
        raise SystemExit("vm2's port is open before any rule: the firewall is not there")
    opened, closed = [], []
    print(f"\nfirewall: tcp {PORT} from the group, {args.rounds} rounds (s, request to a "
          "peer's new connection, upper bounds)")  # fmt: skip
    for index in range(args.rounds):
        wait(settled, 60, "the group's operations")
        asked = time.monotonic()
        rule = firewall.rule_add(
            group=group, by=student, protocol="tcp", port_from=PORT, source="group"
        )
        wait(reaches, 30, "the rule to open")
        opened.append(time.monotonic() - asked)
        if index == args.rounds - 1:
            break  # the last rule stays for the throughput
        wait(settled, 60, "the group's operations")
        asked = time.monotonic()
        firewall.rule_remove(rule=rule, by=student)
        wait(lambda: not reaches(), 30, "the rule to close")
        closed.append(time.monotonic() - asked)
    wait(settled, 60, "the group's operations")
    applied = [
        op.params.get("timings", {}).get("firewall_s")
        for op in Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC).order_by("pk")
    ]
    print(f"  opened: {spread(opened)}  ({', '.join(f'{s:.2f}' for s in opened)})")
    if closed:
        print(f"  closed: {spread(closed)}  ({', '.join(f'{s:.2f}' for s in closed)})")
    print(f"  firewall_sync on its host: {spread([a for a in applied if a is not None])} "
          f"({len(applied)} operations)")  # fmt: skip

    # Throughput: vm1 to a sink on vm3 (one host) and on vm2 (across).
    print(f"\nthroughput, {args.megabytes} MiB over TCP from vm1 (Python in both guests)")
    for target, where in (("vm3", "one host (the bridge)"), ("vm2", "across (VXLAN)")):
        said = guest("vm1", f"python3 - {target} {args.megabytes}", input=SEND, timeout=300)
        if said.returncode != 0:
            raise SystemExit(f"sending to {target} failed: {said.stderr}")
        seconds = float(said.stdout.strip())
        mbit = args.megabytes * 8 * 1.048576 / seconds
        print(f"  vm1 -> {target}, {where}: {seconds:.2f} s, {mbit:.0f} Mbit/s")


if __name__ == "__main__":
    main()
