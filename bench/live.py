"""A bulk start of a whole class with its pages open: how soon every page shows the end,
and how many renderings it took.

    .venv/bin/python bench/live.py [--groups 50] [--workers 2] [--coalesce-ms 100]

Seeds the course of bench/pages.py (N approved groups, vm1 running and vm2 stopped in
each), serves the site as the Procfile does (DEBUG off) on 127.0.0.1 with a private
channel-layer prefix on the local Redis, and opens N + 1 events sockets: one student of
every group on their group page, the instructor on the overview. Each client does what
live.js does: one GET of its page when its socket opens, then it applies the pushed
regions of its page and audience (keeping the newest of each region).

Then a child process plays the operator and the worker with the real services: the
overview's bulk Start (``vms_bulk_request``: N operations), then every operation through
``runner.operation_run`` — claim, progress, the VM observed running, succeeded, and the
SSH-access syncs that a start asks for — with the hypervisor's part simulated (no guest:
the executors report progress and the state the host would). Every event takes the real
publish path: after commit, coalesced, rendered once per audience, pushed through Redis
and the server's consumers.

Prints the time from the last change to the moment every client holds the final state
(every group page: both VMs running, nothing in progress; the overview: 2N running and
nothing in progress), the renderings made (pushes per audience, page GETs) against
clients × events, and the frames received. Everything stays on 127.0.0.1 and stops by
itself.
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pages  # noqa: E402  (bench/pages.py: seeding, sessions, the server)

ROOT = pages.ROOT


# --- the child: operator and worker ----------------------------------------------------------


def child(coalesce_ms: int) -> None:
    """Bulk start through the services, then run every operation as a worker would."""
    import django

    os.environ["LIVE_COALESCE_MS"] = str(coalesce_ms)
    sys.path.insert(0, str(ROOT))
    django.setup()
    from dataclasses import replace

    from django.contrib.auth import get_user_model

    from labs.choices import ObservedState, OperationStatus
    from labs.compute import bulk, dispatch, kinds, records, runner
    from labs.live import events, regions
    from labs.models import Course, Operation

    def start(op):  # what the libvirt driver reports on the way, and the state it leaves
        report = records.operation_progress(op)
        report("defining the domain")
        report("starting the domain")
        records.vm_observe(op.vm, ObservedState.RUNNING)

    def nothing(op):
        return None

    for name, entry in list(kinds.CATALOGUE.items()):
        kinds.CATALOGUE[name] = replace(entry, executor=start if name == "start" else nothing)
    dispatch.task_send = lambda operation_id: ""  # the loop below is the worker

    course = Course.objects.get(slug=pages.COURSE)
    instructor = get_user_model().objects.get(username="instructor")
    began = time.time()
    result = bulk.vms_bulk_request(course=course, kind="start", by=instructor)
    ran = 0
    while True:
        queued = list(
            Operation.objects.filter(status=OperationStatus.QUEUED)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        if not queued:
            break
        for operation_id in queued:
            runner.operation_run(operation_id=operation_id, worker="bench@sim", may_retry=False)
            ran += 1
    last_change = time.time()
    time.sleep(coalesce_ms / 1000 + 0.05)
    deadline = time.monotonic() + 30
    while not events.regions_idle() and time.monotonic() < deadline:
        time.sleep(0.05)  # the last window's push goes out before this process ends
    print(
        json.dumps(
            {
                "queued": len(result.queued),
                "ran": ran,
                "began": began,
                "last_change": last_change,
                "renders": dict(regions.RENDERS),
            }
        ),
        flush=True,
    )


# --- the clients -------------------------------------------------------------------------------

REGION = re.compile(r'data-live-region="([^"]+)"')


class Client:
    def __init__(self, *, path: str, cookie: str, page: str, audience: str, ident: int):
        self.path, self.cookie, self.page, self.audience, self.ident = (
            path,
            cookie,
            page,
            audience,
            ident,
        )
        self.regions: dict[str, str] = {}
        self.at = 0.0
        self.frames = 0
        self.pushes = 0  # renderings of its own page applied
        self.events = 0  # the small events (announcements)
        self.final_at: float | None = None

    def is_final(self, vms: int) -> bool:
        if self.page == "group":
            machines = self.regions.get("machines", "")
            return machines.count("state-running") == 2 and "vm-activity" not in machines
        counts, groups = self.regions.get("counts", ""), self.regions.get("groups", "")
        return f"<strong>{vms}</strong> running" in counts and (
            ": queued" not in groups and ": running" not in groups
        )

    def take(self, push: dict, vms: int) -> None:
        if push.get("page") != self.page or push.get("audience") != self.audience:
            return
        if str(push.get("group" if self.page == "group" else "course")) != str(self.ident):
            return
        if push.get("at", 0) < self.at:
            return
        self.at = push.get("at", 0)
        self.pushes += 1
        self.regions.update(push["regions"])
        if self.final_at is None and self.is_final(vms):
            self.final_at = time.time()


async def run_client(client: Client, port: int, vms: int, opened, stop) -> None:
    import websockets

    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/events/",
        additional_headers={"Cookie": client.cookie},
        origin="http://127.0.0.1",
        max_size=None,
    ) as ws:
        # On open, live.js fetches its page once (the catch-up).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {client.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {client.cookie}\r\n"
            "X-Live-Refresh: 1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        await reader.read()
        writer.close()
        opened.set_result(None) if not opened.done() else None
        while not stop.is_set():
            try:
                frame = await asyncio.wait_for(ws.recv(), timeout=0.5)
            except TimeoutError:
                continue
            client.frames += 1
            payload = json.loads(frame)
            if payload.get("type") == "regions":
                client.take(payload, vms)
            elif payload.get("type") in ("operation", "vm", "group"):
                client.events += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="web server processes")
    parser.add_argument("--coalesce-ms", type=int, default=100)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.coalesce_ms)
        return

    tmp = tempfile.TemporaryDirectory(prefix="stratus-bench-live-")
    db_env = {
        "DATABASE_URL": "",
        "SQLITE_PATH": str(Path(tmp.name) / "bench.sqlite3"),
        "CHANNEL_LAYER_PREFIX": f"stratus-bench-live-{secrets.token_hex(4)}",
        "LIVE_COALESCE_MS": str(args.coalesce_ms),
    }
    server = None
    try:
        pages._setup_django(db_env)
        from django.db import connections

        from labs.models import Course, Group, Membership

        pages.seed(1, args.groups)
        course = Course.objects.get(slug=pages.COURSE)
        clients = []
        for group in Group.objects.order_by("pk"):
            username = (
                Membership.objects.filter(group=group)
                .order_by("user__username")
                .values_list("user__username", flat=True)
                .first()
            )
            clients.append(
                Client(
                    path=f"/groups/{group.pk}/",
                    cookie=pages.session_cookie(username),
                    page="group",
                    audience="members",
                    ident=group.pk,
                )
            )
        clients.append(
            Client(
                path=f"/courses/{pages.COURSE}/overview/",
                cookie=pages.session_cookie("instructor"),
                page="course",
                audience="staff",
                ident=course.pk,
            )
        )
        connections.close_all()
        server, port = pages.serve(db_env, args.workers, Path(tmp.name) / "server.log")
        vms = 2 * args.groups
        env = {**pages._server_env(db_env), "LIVE_COALESCE_MS": str(args.coalesce_ms)}

        async def scenario():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            opened = [loop.create_future() for _ in clients]
            tasks = [
                asyncio.create_task(run_client(c, port, vms, o, stop))
                for c, o in zip(clients, opened, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*opened), timeout=60)
            await asyncio.sleep(1)  # every subscription is in place
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                "--coalesce-ms",
                str(args.coalesce_ms),
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            report = json.loads(out.decode().strip().splitlines()[-1])
            deadline = time.time() + 10
            while time.time() < deadline and any(c.final_at is None for c in clients):
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            return report

        report = asyncio.run(scenario())
        last = report["last_change"]
        done = [c.final_at - last for c in clients if c.final_at is not None]
        missing = [c.path for c in clients if c.final_at is None]
        renders = report["renders"]
        pushed = sum(renders.values())
        frames = sum(c.frames for c in clients)
        print(
            f"{args.groups} groups, {len(clients)} sockets ({args.groups} group pages, one "
            f"overview), web: uvicorn --workers {args.workers}, LIVE_COALESCE_MS "
            f"{args.coalesce_ms}, 127.0.0.1"
        )
        print(
            f"  bulk start: {report['queued']} operations queued, {report['ran']} run "
            f"(with the SSH syncs), {last - report['began']:.2f} s from the request to "
            "the last change"
        )
        if done:
            print(
                f"  every client holds the final state {max(done):.2f} s after the last "
                f"change ({sum(d <= 0 for d in done)} of {len(done)} already before it: "
                "their group was done earlier)"
            )
        if missing:
            print(f"  NOT final after 10 s: {len(missing)} clients, e.g. {missing[:3]}")
            if os.environ.get("BENCH_LIVE_DUMP"):
                stuck = next(c for c in clients if c.final_at is None)
                print(json.dumps(stuck.regions, indent=1))
        print(
            f"  renderings pushed: {pushed} ({', '.join(f'{k} {v}' for k, v in renders.items())})"
            f"; page GETs: {len(clients)} (one per socket open); the same however many "
            "pages each group has open"
        )
        events_seen = sum(c.events for c in clients)
        print(
            f"  events delivered to the pages: {events_seen} (the old transport rendered the "
            f"whole page again for each open page on each, coalesced per 120 ms: up to "
            f"{events_seen} page renders here, four times that with every member's page "
            f"open); frames received in all: {frames}"
        )
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
