"""The group page and the instructor overview under 50 concurrent clients, and the SQL
queries each page makes for 1 and for 50 groups.

    .venv/bin/python bench/pages.py [--clients 50] [--seconds 10] [--groups 50]
                                    [--workers 1] [--postgres postgres://postgres@127.0.0.1:5432]

Builds a throwaway database (a SQLite file in a temporary directory, or with --postgres a
new database on that server, dropped afterwards), seeds one course with N approved groups
(four students, two VMs with two snapshots and ten operations each, one of them failed),
counts the queries of each page with the test client, then serves the site the way the
Procfile does (DEBUG off; ``--server`` picks uvicorn, granian (ASGI or WSGI) or gunicorn
(WSGI, threads)) on 127.0.0.1 and loads each page with N concurrent
keep-alive clients, each signed in:

- closed loop: every client asks again as soon as it has its answer (the worst case);
- paced: every client asks once a second (a class with the pages open; live updates make
  an open page fetch itself again when something changes).

Prints p50/p95/p99 latency and throughput. Everything stays on 127.0.0.1 and stops by itself.
"""

import argparse
import asyncio
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COURSE = "bench"


def _setup_django(db_env: dict[str, str]) -> None:
    os.environ.update(db_env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    # The server checks the sessions made here: same key (and a fresh one per run).
    os.environ["SECRET_KEY"] = secrets.token_urlsafe(50)
    os.environ["EMAIL_BACKEND"] = "django.core.mail.backends.locmem.EmailBackend"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # This run's page cache (labs/live/pagecache.py), apart from any other site's.
    os.environ["PAGE_CACHE_PREFIX"] = f"stratus-bench-{secrets.token_hex(4)}:"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, skip_checks=True)
    _collect_static()


def _collect_static() -> None:
    """The server runs with DEBUG off and serves the collected, hashed files with their
    manifest (as the Dockerfile collects them at build time). Collecting in this process,
    whose DEBUG is on, would use the development storage and write no manifest: every page
    would then fail ("Missing staticfiles manifest entry"). So collect as the server will."""
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--no-input", "-v", "0"],
        cwd=ROOT,
        env={**_server_env({}), "DJANGO_SETTINGS_MODULE": "portal.settings"},
        check=True,
    )


def seed(first: int, count: int):
    """Groups number ``first`` .. ``first + count - 1`` of the bench course, with their VMs."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from labs.choices import (
        GroupStatus,
        ObservedState,
        OperationKind,
        OperationStatus,
        Role,
    )
    from labs.models import (
        Course,
        Group,
        Host,
        Image,
        Membership,
        Operation,
        Snapshot,
        Vm,
        VmTemplate,
    )

    User = get_user_model()
    course, created = Course.objects.get_or_create(slug=COURSE, defaults={"title": "Bench"})
    if created:
        ines = User.objects.create_user("instructor", password=None)
        Membership.objects.create(course=course, user=ines, role=Role.INSTRUCTOR)
        image = Image.objects.create(name="deb", os="Debian 12", path="/srv/base.qcow2")
        VmTemplate.objects.create(course=course, image=image, count=2, quota_vms=3)
        for n in range(2):
            Host.objects.create(
                name=f"hv{n}",
                uri="qemu:///system",
                vcpus=64,
                memory_mib=262144,
                disk_gib=4000,
                ssh_port_min=22000,
                ssh_port_max=22999,
            )
    image = Image.objects.get(name="deb")
    hosts = list(Host.objects.order_by("name"))
    now = timezone.now()
    kinds = [OperationKind.START, OperationKind.SNAPSHOT, OperationKind.STOP]
    for g in range(first, first + count):
        users = [User(username=f"g{g:03}s{m}") for m in range(4)]
        for user in users:
            user.set_unusable_password()
        User.objects.bulk_create(users)
        group = Group.objects.create(
            course=course,
            name=f"Group {g:03}",
            project_title="Benchmark project",
            project_idea="A project idea of a few words.",
            ssh_public_key=f"ssh-ed25519 AAAA{g:08} bench",
            ssh_key_fingerprint=f"SHA256:bench{g:08}",
            ssh_key_type="ssh-ed25519",
            ssh_key_bits=256,
            status=GroupStatus.APPROVED,
        )
        Membership.objects.bulk_create(
            [Membership(course=course, user=u, group=group, role=Role.STUDENT) for u in users]
        )
        for v in range(2):
            vm = Vm.objects.create(
                group=group,
                name=f"vm{v + 1}",
                host=hosts[(g + v) % len(hosts)],
                image=image,
                vcpus=1,
                memory_mib=1024,
                disk_gib=10,
                ssh_port=22000 + g * 2 + v,
                instance_id=secrets.token_hex(8),
                observed_state=ObservedState.RUNNING if v == 0 else ObservedState.SHUTOFF,
            )
            Snapshot.objects.bulk_create(
                [Snapshot(vm=vm, name=f"snap{s}", with_memory=s == 0) for s in range(2)]
            )
            Operation.objects.bulk_create(
                [
                    Operation(
                        vm=vm,
                        kind=kinds[o % len(kinds)],
                        requested_by=users[o % 4],
                        status=OperationStatus.FAILED if o == 0 else OperationStatus.SUCCEEDED,
                        error="The host said no." if o == 0 else "",
                        progress="done",
                        finished_at=now,
                    )
                    for o in range(10)
                ]
            )
    return course


def count_queries(path: str, username: str) -> tuple[int, int]:
    """(status, queries) of one GET of ``path`` as ``username``, with the test client."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(SERVER_NAME="127.0.0.1")
    client.force_login(get_user_model().objects.get(username=username))
    client.get(path)  # warm: the session, the content types
    with CaptureQueriesContext(connection) as queries:
        status = client.get(path).status_code
    return status, len(queries)


def session_cookie(username: str) -> str:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


# --- the load ----------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _client(port, path, cookie, until, paced, latencies, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nAccept: text/html\r\n\r\n"
    ).encode()
    if paced:
        await asyncio.sleep(random.random())  # spread the clients over the second
    try:
        while time.monotonic() < until:
            start = time.monotonic()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(time.monotonic() - start)
            if status != 200:
                errors.append(status)
            if paced:
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - start)))
    finally:
        writer.close()


async def load(port, path, cookies, seconds, paced) -> tuple[list[float], list[int], float]:
    latencies: list[float] = []
    errors: list[int] = []
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(
        *(_client(port, path, c, until, paced, latencies, errors) for c in cookies)
    )
    return latencies, errors, time.monotonic() - start


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _server_env(db_env: dict[str, str]) -> dict[str, str]:
    """The environment of the server under test: production settings on loopback."""
    return {
        **os.environ,
        **db_env,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DEBUG": "false",
        "SECRET_KEY": os.environ["SECRET_KEY"],
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "SECURE_HSTS_SECONDS": "0",
        # The bench sends no mail (its EMAIL_BACKEND is locmem): say so, or DEBUG off
        # refuses to start without a backend that delivers.
        "ALLOW_LOCAL_EMAIL_BACKEND": "true",
        "LOG_LEVEL": "WARNING",
    }


# The servers measured (--server): the command line of each, for a port and a number of
# worker processes. WSGI ones serve the pages only (websockets would go to an ASGI one).
SERVERS = {
    "uvicorn": lambda port, workers: [
        *("-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1"),
        *("--port", str(port), "--no-access-log", "--workers", str(workers)),
    ],
    "granian": lambda port, workers: [
        *("-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", str(workers), "--no-access-log", "portal.asgi:application"),
    ],
    "granian-wsgi": lambda port, workers: [
        *("-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", str(workers), "--blocking-threads", "4", "--no-access-log"),
        "portal.wsgi:application",
    ],
    "gunicorn": lambda port, workers: [
        *("-m", "gunicorn", "portal.wsgi:application", "--bind", f"127.0.0.1:{port}"),
        *("--workers", str(workers), "--worker-class", "gthread", "--threads", "4"),
    ],
}


def serve(
    db_env: dict[str, str], workers: int, log: Path, server: str = "uvicorn"
) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _server_env(db_env)
    command = [sys.executable, *SERVERS[server](port, workers)]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{server} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--server", choices=sorted(SERVERS), default="uvicorn")
    parser.add_argument("--postgres", help="server URL; a throwaway database is made there")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="stratus-bench-")
    pg_name = None
    if args.postgres:
        import psycopg

        pg_name = f"stratus_bench_{secrets.token_hex(4)}"
        with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        db_env = {"DATABASE_URL": f"{args.postgres}/{pg_name}"}
    else:
        db_env = {"DATABASE_URL": "", "SQLITE_PATH": str(Path(tmp.name) / "bench.sqlite3")}
    server = None
    try:
        _setup_django(db_env)
        from django.db import connections

        seed(1, 1)
        from labs.models import Group

        group_path = f"/groups/{Group.objects.get(name='Group 001').pk}/"
        overview_path = f"/courses/{COURSE}/overview/"
        student, instructor = "g001s0", "instructor"
        counts = {
            1: (count_queries(group_path, student), count_queries(overview_path, instructor))
        }
        seed(2, args.groups - 1)
        counts[args.groups] = (
            count_queries(group_path, student),
            count_queries(overview_path, instructor),
        )
        print(f"SQL queries per page ({'PostgreSQL' if pg_name else 'SQLite'})")
        print(f"  {'groups':>6}  {'group page':>10}  {'overview':>8}")
        for n, ((gs, gq), (os_, oq)) in counts.items():
            bad = "" if gs == os_ == 200 else f"  (HTTP {gs}, {os_})"
            print(f"  {n:>6}  {gq:>10}  {oq:>8}{bad}")

        # Every client its own session: the members of the first groups, one instructor.
        from labs.models import Membership

        rows = (
            Membership.objects.filter(group__isnull=False)
            .order_by("user__username")
            .values_list("user__username", "group_id")[: args.clients]
        )
        student_cookies = [(f"/groups/{gid}/", session_cookie(u)) for u, gid in rows]
        instructor_cookie = session_cookie(instructor)
        connections.close_all()

        server_log = Path(tmp.name) / "server.log"
        server, port = serve(db_env, args.workers, server_log, args.server)
        print(
            f"\n{args.clients} clients, {args.seconds:.0f} s each, {args.groups} groups, "
            f"{args.server} --workers {args.workers}, DEBUG off, 127.0.0.1"
        )
        print(
            f"  {'page':<22} {'mode':<7} {'requests':>8} {'req/s':>7} "
            f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6}"
        )
        runs = [
            ("group page (students)", None),
            ("overview (instructor)", overview_path),
        ]
        any_errors = False
        for label, path in runs:
            for paced in (False, True):
                if path is None:
                    # Each student loads their own group's page.
                    by_path: dict[str, list[str]] = {}
                    for p, cookie in student_cookies:
                        by_path.setdefault(p, []).append(cookie)

                    async def all_groups(paced=paced, by_path=by_path):
                        results = await asyncio.gather(
                            *(load(port, p, cs, args.seconds, paced) for p, cs in by_path.items())
                        )
                        lat = [x for r in results for x in r[0]]
                        err = [x for r in results for x in r[1]]
                        return lat, err, max(r[2] for r in results)

                    latencies, errors, elapsed = asyncio.run(all_groups())
                else:
                    cookies = [instructor_cookie] * args.clients
                    latencies, errors, elapsed = asyncio.run(
                        load(port, path, cookies, args.seconds, paced)
                    )
                any_errors = any_errors or bool(errors)
                print(
                    f"  {label:<22} {'paced' if paced else 'closed':<7} {len(latencies):>8} "
                    f"{len(latencies) / elapsed:>7.0f} "
                    f"{percentile(latencies, 50) * 1000:>7.1f} "
                    f"{percentile(latencies, 95) * 1000:>7.1f} "
                    f"{percentile(latencies, 99) * 1000:>7.1f} {len(errors):>6}"
                    + (f" (HTTP {sorted(set(errors))})" if errors else "")
                )
        if any_errors:
            kept = Path(tempfile.gettempdir()) / "stratus-bench-pages-server.log"
            kept.write_bytes(server_log.read_bytes())
            print(f"Some requests failed; the server's log is kept in {kept}")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        if pg_name:
            from django.db import connections

            connections.close_all()
            import psycopg

            with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        tmp.cleanup()


if __name__ == "__main__":
    main()
