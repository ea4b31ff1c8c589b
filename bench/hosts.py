"""Many hosts, by simulation: placement of every VM, a reconcile pass and a drain plan,
with the SQL queries each makes and the time it takes.

    .venv/bin/python bench/hosts.py [--hosts 20] [--vms-per-host 100] [--group-size 4]

No guest is booted and no libvirtd is asked: every host's URI is ``test:///default``
(libvirt's test driver, in this process; all the hosts share its one connection). The
database is a throwaway SQLite file; the channel layer is Channels' in-memory one, so
live events are built (their queries are counted) but reach no Redis.

- Seed (not measured): one course (spread policy), ``hosts`` hosts each with room for
  1.25 × ``vms-per-host`` VMs of 1 vCPU, 1 GiB, 4 GiB, and hosts × vms-per-host VM rows
  in groups of ``group-size``, unplaced (as approval leaves them before placement).
- Placement: ``vm_place`` for each VM, one by one; the queries of the first 100 and of
  the last 100 placements are compared (constant, or growing with the VMs placed).
- Reconcile: every placed VM is marked running (as if provisioned), then one
  ``reconcile_all`` pass. The test driver holds none of these domains, so every VM is
  observed *missing*: that is expected here, and it is the costly pass (each VM changes
  state: its consoles close and an event is published). A second pass, where nothing
  changes, is the steady state of the every-minute beat.
- Drain plan of the first host: for each of its VMs, ``move_destination`` (what
  ``host_drain`` asks before requesting a move), counting where each would go and how
  many stay. No move is requested: each decision is recorded on the VM's row (host, no
  SSH port) so the next decision sees it, as the moves would, and all of it is rolled
  back at the end. Only ``move_destination``'s own queries are counted.

Prints a table (step, items, total time, queries, queries per item) and the queries of
one item of each step, grouped by statement. Query counts are SQLite's: they include
the ``BEGIN`` of each transaction.
"""

import argparse
import os
import re
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URI = "test:///default"


def setup_django(db_path: Path) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "SQLITE_PATH": str(db_path),
            "DATABASE_URL": "",
            "CELERY_BROKER_URL": "memory://",
            "CHANNEL_LAYER_PREFIX": f"stratus-bench-hosts{secrets.token_hex(3)}",
            "LOG_LEVEL": "WARNING",  # reconcile logs every VM's drift at INFO
        }
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    # Events are built and sent, but to this process only (no Redis is touched).
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    call_command("migrate", verbosity=0)
    # Django keeps the last 9,000 queries; a step makes more. Keep them all (and clear
    # the log before each step), or CaptureQueriesContext would count 0 once it is full.
    connection.queries_log = deque()


def seed(*, hosts: int, vms_per_host: int, group_size: int) -> int:
    """The hosts, one course and its groups with their VMs, unplaced. Returns the VMs."""
    from labs.choices import GroupStatus, ObservedState, PlacementPolicy
    from labs.models import Course, Group, Host, Image, Vm

    room = -(-vms_per_host * 5 // 4)  # VMs each host has room for: 1.25 × vms-per-host
    Host.objects.bulk_create(
        Host(
            name=f"hv{n:02}",
            uri=URI,
            vcpus=-(-room // 4),  # cpu_overcommit 4
            memory_mib=room * 1024,  # memory_overcommit 1
            disk_gib=room * 2,  # disk_overcommit 2
            ssh_port_min=22000,
            ssh_port_max=22000 + max(999, 2 * room),
            published_port_min=22000 + max(999, 2 * room) + 1,
            published_port_max=22000 + max(999, 2 * room) + 1000,
        )
        for n in range(hosts)
    )
    course = Course.objects.create(
        slug="bench-hosts", title="Bench hosts", placement=PlacementPolicy.SPREAD
    )
    image = Image.objects.create(name="deb", os="Debian 12", path="/srv/base.qcow2")
    total = hosts * vms_per_host
    groups = Group.objects.bulk_create(
        Group(
            course=course,
            name=f"Group {g:04}",
            project_title="Benchmark project",
            project_idea="A project idea of a few words.",
            ssh_public_key=f"ssh-ed25519 AAAA{g:08} bench",
            ssh_key_fingerprint=f"SHA256:bench{g:08}",
            ssh_key_type="ssh-ed25519",
            ssh_key_bits=256,
            status=GroupStatus.APPROVED,
        )
        for g in range(-(-total // group_size))
    )
    Vm.objects.bulk_create(
        Vm(
            group=groups[i // group_size],
            name=f"vm{i % group_size + 1}",
            image=image,
            vcpus=1,
            memory_mib=1024,
            disk_gib=4,
            observed_state=ObservedState.NEW,
        )
        for i in range(total)
    )
    return total


class Step:
    """One measured step: per item, its queries (sql, seconds) and its wall time."""

    def __init__(self, name: str, per: str) -> None:
        self.name, self.per = name, per
        self.items: list[tuple[int, float]] = []  # (queries, seconds)
        self.example: list[dict] = []

    def run(self, fn, *args, nested: bool = False, **kwargs):
        from django.db import connection, reset_queries
        from django.test.utils import CaptureQueriesContext

        if not nested:  # inside another step's capture, its log must stay
            reset_queries()
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds = time.perf_counter() - started
        self.items.append((len(queries), seconds))
        self.example = list(queries.captured_queries)
        return result

    @property
    def queries(self) -> int:
        return sum(q for q, _ in self.items)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.items)


def shape(sql: str) -> str:
    """A statement without its values: quoted strings, numbers and lists of them."""
    sql = re.sub(r"'(?:[^']|'')*'", "?", sql)
    sql = re.sub(r"\b\d+(?:\.\d+)?\b", "?", sql)
    sql = re.sub(r"\(\?(?:, \?)*\)", "(…)", sql)
    return sql if len(sql) <= 110 else sql[:109] + "…"


def print_queries(title: str, queries: list[dict]) -> None:
    grouped: dict[str, list[float]] = defaultdict(list)
    for query in queries:
        grouped[shape(query["sql"])].append(float(query["time"]))
    total = sum(sum(times) for times in grouped.values())
    print(f"\n{title}: {len(queries)} queries, {total * 1000:.1f} ms in the database")
    for sql, times in sorted(grouped.items(), key=lambda item: -len(item[1])):
        print(f"  {len(times):5} × {sum(times) * 1000:7.1f} ms  {sql}")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--vms-per-host", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=4, help="VMs per group")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stratus-bench-hosts-") as tmp:
        setup_django(Path(tmp) / "hosts.sqlite3")
        bench(args)


def bench(args) -> None:
    from django.db import transaction

    from labs.choices import ObservedState
    from labs.compute import placement, reconcile
    from labs.models import Host, Vm

    total = seed(hosts=args.hosts, vms_per_host=args.vms_per_host, group_size=args.group_size)
    groups = -(-total // args.group_size)
    print(
        f"{args.hosts} hosts ({URI}), {total} VMs in {groups} groups of "
        f"{args.group_size}, spread policy; SQLite"
    )

    # --- placement, one VM at a time ----------------------------------------------------
    place = Step("place (vm_place)", "VM")
    unplaced = list(Vm.objects.filter(host__isnull=True).order_by("pk"))
    placed = sum(bool(place.run(placement.vm_place, vm=vm)) for vm in unplaced)
    place_example = place.example
    per_host = Counter(Vm.objects.filter(host__isnull=False).values_list("host__name", flat=True))

    # --- reconcile: every VM "provisioned" and running; the test driver has none --------
    Vm.objects.filter(host__isnull=False).update(observed_state=ObservedState.RUNNING)
    passes = []
    host_examples: list[list[dict]] = []
    for label in ("reconcile pass 1 (running → missing)", "reconcile pass 2 (no change)"):
        step, hosts_step = Step(label, "host"), Step(label, "host")
        original = reconcile.host_reconcile

        def host_reconcile(*, host, _step=hosts_step, _original=original):
            return _step.run(_original, host=host, nested=True)

        reconcile.host_reconcile = host_reconcile  # to count each host's share
        try:
            _placed_again, reports = step.run(reconcile.reconcile_all)
        finally:
            reconcile.host_reconcile = original
        step.items = [(step.queries, step.seconds)]
        passes.append((step, hosts_step, reports))
        host_examples.append(hosts_step.example)
    observed = Counter(
        Vm.objects.filter(host__isnull=False).values_list("observed_state", flat=True)
    )

    # --- drain plan of one host: where each of its VMs would go -------------------------
    drained = Host.objects.order_by("name").first()
    plan = Step(f"drain plan of {drained.name} (move_destination)", "VM")
    where: Counter = Counter()
    with transaction.atomic():
        for vm in Vm.objects.live().filter(host=drained).order_by("pk"):
            target = plan.run(placement.move_destination, vm=vm, away_from=drained)
            where[target.name if target else "(stays: no host has room)"] += 1
            if target is not None:  # as the move would: the next decision sees it
                Vm.objects.filter(pk=vm.pk).update(host=target, ssh_port=None)
        transaction.set_rollback(True)

    # --- the figures ----------------------------------------------------------------------
    rows = [(place, place.per, len(place.items))]
    for step, hosts_step, _reports in passes:
        rows.append((step, "host", len(hosts_step.items)))
    rows.append((plan, plan.per, len(plan.items)))
    print(
        f"\n{'step':42} {'items':>10} {'total s':>9} {'queries':>8} {'q/item':>8} {'ms/item':>8}"
    )
    for step, per, count in rows:
        print(
            f"{step.name:42} {count:>6} {per + 's':<4}{step.seconds:>8.2f} {step.queries:>8} "
            f"{step.queries / max(count, 1):>8.1f} {step.seconds * 1000 / max(count, 1):>8.2f}"
        )

    first, last = place.items[:100], place.items[-100:]
    constant = {q for q, _ in place.items}
    print(
        f"\nplacement: {placed} of {total} placed; queries per placement "
        f"{min(constant)}..{max(constant)} (first 100: {mean(q for q, _ in first):.2f}, "
        f"last 100: {mean(q for q, _ in last):.2f}: "
        f"{'constant' if len(constant) == 1 else 'NOT constant'}); time per placement "
        f"first 100 {mean(s for _, s in first) * 1000:.2f} ms, last 100 "
        f"{mean(s for _, s in last) * 1000:.2f} ms"
    )
    print("  VMs per host: " + ", ".join(f"{name} {n}" for name, n in sorted(per_host.items())))
    for step, hosts_step, reports in passes:
        vms = sum(r.observed for r in reports)
        per_host_q = sorted({q for q, _ in hosts_step.items})
        print(
            f"{step.name}: {len(reports)} hosts, {vms} VMs observed, "
            f"{sum(len(r.drift or []) for r in reports)} drifted; queries per host "
            f"{per_host_q[0]}..{per_host_q[-1]}, per VM {hosts_step.queries / max(vms, 1):.2f}, "
            f"outside the hosts {step.queries - hosts_step.queries}"
        )
    print(
        "  VMs observed: "
        + ", ".join(f"{state} {n}" for state, n in observed.most_common())
        + f" (expected: {URI} holds none of these domains, so every VM is missing)"
    )
    print(
        f"{plan.name}: {len(plan.items)} VMs; "
        + ", ".join(f"{name} {n}" for name, n in sorted(where.items()))
        + f"; queries per VM {min(q for q, _ in plan.items)}..{max(q for q, _ in plan.items)}"
        " (rolled back: nothing moved)"
    )

    print_queries("one placement (the last)", place_example)
    print_queries(f"{passes[0][0].name}, one host (the last)", host_examples[0])
    print_queries(f"{passes[1][0].name}, one host (the last)", host_examples[1])
    print_queries("drain plan, one VM (the last)", plan.example)


if __name__ == "__main__":
    main()
