"""Console proxy throughput and latency: raw TCP, websockify, and the Channels consumer.

    .venv/bin/python bench/console.py [--mb 200] [--rtts 2000] [--sessions 200] [--repeat 3]
        [--paths raw,websockify,uvicorn,...] [--extra-python /path/to/venv/bin/python]

One run measures, for every path to a fake VNC server (a sink/echo process on loopback):

- one session moving MB megabytes (10^6 bytes) VM -> browser ("down", a console's heavy
  direction), browser -> VM ("up") and both at once ("both": MB each way, the sum), each
  the median of REPEAT runs;
- the round-trip time of 64-byte messages through an echo (RTTS round trips, p50/p99),
  and what the path adds to raw TCP's;
- SESSIONS concurrent sessions on one server process: how long connecting takes (ticket,
  database checks, upgrade; p99), the p99 round trip with all of them pinging at once,
  the aggregate rate when all of them download MB/SESSIONS megabytes at once, and the
  server's memory while they are open (PSS of its process tree: forked children's shared
  pages count once);
- the server's CPU time per MB of the one-session download.

Paths: ``raw`` (TCP straight to the sink), ``websockify`` (manage.py console_proxy, one
forked process per session), and the Channels consumer (/ws/vms/<id>/console/) under
``uvicorn`` (as the Procfile runs it: ``--ws auto``, i.e. websockets' sans-I/O protocol),
``uvicorn-legacy`` (``--ws websockets``, deprecated), ``uvicorn-wsproto``,
``uvicorn-deflate`` (the default, with the client offering permessage-deflate as browsers
do), ``hypercorn`` and ``daphne``. Servers that are not installed for the python running them
are skipped: ``--extra-python`` names another interpreter (a venv with the project's
requirements plus hypercorn, daphne, wsproto) to run those with.

Everything runs on 127.0.0.1 with a throwaway SQLite database (migrated here; one user,
one approved group, one running VM pointing at the sink, one signed-in session), the
project's Redis for tickets and the channel layer, and real tickets for every session.
Every process the bench starts is stopped by its PID (its process group) at the end.
Client, servers and sink share this machine's cores: compare rows, not absolutes.
"""

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
CHUNK = 64 * 1024  # websocket messages the client sends; the consumer reads 64 KiB too
PING = 64  # bytes per latency message
CONCURRENT_RTTS = 20  # round trips per session in the concurrency phase
SCENARIO_TIMEOUT = 180.0  # seconds, per measurement
ORIGIN_HOST = "127.0.0.1"

# name -> (a module the server's python must import, the command after that python)
ASGI = "portal.asgi:application"
PATHS = {
    "raw": None,
    "websockify": ("websockify", ["manage.py", "console_proxy", "--host", "bench"]),
    # uvicorn's default (--ws auto) is websockets' sans-I/O implementation, as in the Procfile
    "uvicorn": ("uvicorn", ["-m", "uvicorn", ASGI]),
    "uvicorn-legacy": ("uvicorn", ["-m", "uvicorn", ASGI, "--ws", "websockets"]),
    "uvicorn-wsproto": ("wsproto", ["-m", "uvicorn", ASGI, "--ws", "wsproto"]),
    "uvicorn-deflate": ("uvicorn", ["-m", "uvicorn", ASGI]),
    "hypercorn": ("hypercorn", ["-m", "hypercorn", ASGI]),
    "daphne": ("daphne", ["-m", "daphne", ASGI]),
}
DEFAULT_PATHS = "raw,websockify,uvicorn,uvicorn-legacy,uvicorn-wsproto,uvicorn-deflate,"
DEFAULT_PATHS += "hypercorn,daphne"


# --- the fake VNC server (a separate process: `bench/console.py sink PORT`) -----------


async def sink_main(port: int) -> None:
    """Per connection, a 9-byte header (op, u64 n), then: D send n bytes; U read n, send
    K; B both at once, then K; E echo until EOF."""
    block = secrets.token_bytes(1 << 20)  # incompressible, like Tight/ZRLE screen data

    async def send_n(writer, n):
        view = memoryview(block)
        while n > 0:
            take = min(n, 256 * 1024)
            writer.write(view[:take])
            n -= take
            await writer.drain()

    async def read_n(reader, n):
        while n > 0:
            data = await reader.read(min(n, 1 << 20))
            if not data:
                raise ConnectionError("peer closed early")
            n -= len(data)

    async def handle(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            header = await reader.readexactly(9)
            op, n = header[:1], int.from_bytes(header[1:], "big")
            if op == b"E":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            elif op == b"D":
                await send_n(writer, n)
                while await reader.read(65536):
                    pass
            elif op == b"U":
                await read_n(reader, n)
                writer.write(b"K")
                await writer.drain()
            elif op == b"B":
                await asyncio.gather(send_n(writer, n), read_n(reader, n))
                writer.write(b"K")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- client connections ----------------------------------------------------------------


class RawConn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, token: str | None = None) -> "RawConn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        data = await self.reader.read(1 << 20)
        if not data:
            raise ConnectionError("closed")
        return data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class WsConn:
    cookie = ""
    prefix = ""
    vm_id = 0
    compression: str | None = None

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    async def open(cls, port: int, token: str | None = None) -> "WsConn":
        from websockets.asyncio.client import connect

        ws = await connect(
            f"ws://127.0.0.1:{port}/ws/vms/{cls.vm_id}/console/",
            subprotocols=[cls.prefix + token],
            additional_headers={"Cookie": cls.cookie},
            origin=f"http://{ORIGIN_HOST}:{port}",
            compression=cls.compression,
            proxy=None,
            max_size=None,
            ping_interval=None,
            open_timeout=120,
            close_timeout=5,
        )
        return cls(ws)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(data), CHUNK):
            await self.ws.send(view[i : i + CHUNK])

    async def recv(self) -> bytes:
        return await self.ws.recv()

    async def close(self) -> None:
        await self.ws.close()


def header(op: bytes, n: int = 0) -> bytes:
    return op + n.to_bytes(8, "big")


async def recv_exactly(conn, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await conn.recv()
    return bytes(got)


async def drain_n(conn, n: int) -> None:
    got = 0
    while got < n:
        got += len(await conn.recv())


# --- scenarios -------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    note: str = ""
    down: float | None = None
    up: float | None = None
    both: float | None = None
    rtt_p50: float | None = None
    rtt_p99: float | None = None
    cpu_ms_per_mb: float | None = None
    conn_p99: float | None = None
    conc_rtt_p99: float | None = None
    conc_rate: float | None = None
    pss_mb: float | None = None
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_download(opener, port, tickets, n) -> float:
    conn = await opener(port, tickets())
    try:
        start = time.perf_counter()
        await conn.send(header(b"D", n))
        await drain_n(conn, n)
        return n / MB / (time.perf_counter() - start)
    finally:
        await conn.close()


async def one_upload(opener, port, tickets, n) -> float:
    conn = await opener(port, tickets())
    try:
        payload = secrets.token_bytes(1 << 20)
        start = time.perf_counter()
        await conn.send(header(b"U", n))
        left = n
        while left:
            take = min(left, len(payload))
            await conn.send(payload[:take])
            left -= take
        assert await recv_exactly(conn, 1) == b"K"
        return n / MB / (time.perf_counter() - start)
    finally:
        await conn.close()


async def one_both(opener, port, tickets, n) -> float:
    conn = await opener(port, tickets())
    try:
        payload = secrets.token_bytes(1 << 20)

        async def upload():
            left = n
            while left:
                take = min(left, len(payload))
                await conn.send(payload[:take])
                left -= take

        start = time.perf_counter()
        await conn.send(header(b"B", n))
        await asyncio.gather(upload(), drain_n(conn, n + 1))
        return 2 * n / MB / (time.perf_counter() - start)
    finally:
        await conn.close()


async def ping_pong(conn, count: int) -> list[float]:
    message = secrets.token_bytes(PING)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await conn.send(message)
        await recv_exactly(conn, PING)
        times.append(time.perf_counter() - start)
    return times


async def latency(opener, port, tickets, count) -> list[float]:
    conn = await opener(port, tickets())
    try:
        await conn.send(header(b"E"))
        await ping_pong(conn, 100)  # warm up
        return await ping_pong(conn, count)
    finally:
        await conn.close()


async def concurrent(opener, port, tickets, sessions, total, server) -> dict:
    tokens = [tickets() for _ in range(sessions)]
    connect_times: list[float] = []

    async def opened(token):
        start = time.perf_counter()
        conn = await opener(port, token)
        connect_times.append(time.perf_counter() - start)
        return conn

    pingers = await asyncio.gather(*(opened(t) for t in tokens))
    pss = server.pss_mb() if server else None
    try:
        for conn in pingers:
            await conn.send(header(b"E"))
        rtts = await asyncio.gather(*(ping_pong(c, CONCURRENT_RTTS) for c in pingers))
    finally:
        await asyncio.gather(*(c.close() for c in pingers), return_exceptions=True)

    tokens = [tickets() for _ in range(sessions)]
    downloaders = await asyncio.gather(*(opener(port, t) for t in tokens))
    per_session = total // sessions
    try:
        start = time.perf_counter()
        for conn in downloaders:
            await conn.send(header(b"D", per_session))
        await asyncio.gather(*(drain_n(c, per_session) for c in downloaders))
        rate = per_session * sessions / MB / (time.perf_counter() - start)
    finally:
        await asyncio.gather(*(c.close() for c in downloaders), return_exceptions=True)
    return {
        "conn_p99": percentile(connect_times, 99) * 1000,
        "conc_rtt_p99": percentile([t for r in rtts for t in r], 99) * 1000,
        "conc_rate": rate,
        "pss_mb": pss,
    }


async def measure(row, opener, port, tickets, args, server) -> None:
    n = args.mb * MB

    async def step(name, coro):
        try:
            return await asyncio.wait_for(coro, SCENARIO_TIMEOUT)
        except Exception as error:  # a path that fails one scenario still reports the rest
            row.errors.append(f"{name}: {type(error).__name__}: {error}"[:200])
            return None

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    await step("warm-up", one_download(opener, port, tickets, MB))
    downs, cpus = [], []
    for _ in range(args.repeat):
        cpu_before = server.cpu_seconds() if server else None
        downs.append(await step("down", one_download(opener, port, tickets, n)))
        if server and downs[-1]:
            await asyncio.sleep(0.5)  # let a finished websockify child be reaped
            cpus.append((server.cpu_seconds() - cpu_before) * 1000 / args.mb)
    row.down, row.cpu_ms_per_mb = median(downs), median(cpus)
    ups = [await step("up", one_upload(opener, port, tickets, n)) for _ in range(args.repeat)]
    row.up = median(ups)
    boths = [await step("both", one_both(opener, port, tickets, n)) for _ in range(args.repeat)]
    row.both = median(boths)
    rtts = await step("latency", latency(opener, port, tickets, args.rtts))
    if rtts:
        row.rtt_p50 = statistics.median(rtts) * 1e6
        row.rtt_p99 = percentile(rtts, 99) * 1e6
    result = await step("concurrent", concurrent(opener, port, tickets, args.sessions, n, server))
    if result:
        for key, value in result.items():
            setattr(row, key, value)


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A process the bench started, in its own process group; stopped by its PID."""

    running: list["Proc"] = []

    def __init__(self, argv, *, env, log: Path):
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        Proc.running.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"not listening after {timeout}s: {self.log.read_text()[-2000:]}")

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = (entry / "stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def pss_mb(self) -> float:
        """Memory of the process tree: PSS, so pages forked children share count once."""
        total = 0
        for pid in self._tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        return total / 1024

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self._tree():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # forked children left behind, if any
        if self in Proc.running:
            Proc.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls.running):
            proc.stop()


def importable(python: str, module: str, env: dict) -> bool:
    return (
        subprocess.run(
            [python, "-c", f"import {module}"], env=env, cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )


# --- the run ---------------------------------------------------------------------------


def setup_database(sink_port: int) -> dict:
    """Migrate the throwaway database; one user, group, running VM, and a session."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from labs.choices import GroupStatus, ObservedState, Role
    from labs.models import Course, Group, Host, Image, Membership, Vm

    course = Course.objects.create(slug="bench", title="Bench")
    user = get_user_model().objects.create_user("bench", password=None)
    group = Group.objects.create(
        course=course,
        name="Bench",
        project_title="bench",
        project_idea="bench",
        ssh_public_key="ssh-ed25519 AAAA bench",
        ssh_key_type="ssh-ed25519",
        ssh_key_bits=256,
        ssh_key_fingerprint="SHA256:bench",
        status=GroupStatus.APPROVED,
    )
    Membership.objects.create(course=course, user=user, role=Role.STUDENT, group=group)
    host = Host.objects.create(
        name="bench", uri="test:///default", vcpus=4, memory_mib=4096, disk_gib=40
    )
    image = Image.objects.create(name="bench", os="none", path="/nonexistent")
    vm = Vm.objects.create(
        # An id no other Stratus on this Redis uses: revocations go to the channel-layer
        # group console.vm.<id>, and pub/sub channels are shared by every Redis database.
        pk=900_000_000 + secrets.randbelow(99_999_999),
        group=group,
        name="vm1",
        host=host,
        image=image,
        vcpus=1,
        memory_mib=256,
        disk_gib=1,
        observed_state=ObservedState.RUNNING,
        vnc_host="127.0.0.1",
        vnc_port=sink_port,
    )
    client = Client()
    client.force_login(user)
    return {"user": user, "vm": vm, "session_key": client.session.session_key}


def server_argv(name: str, python: str, port: int) -> list[str]:
    _, command = PATHS[name]
    argv = [python, *command]
    if name == "websockify":
        return argv + [
            "--listen",
            f"127.0.0.1:{port}",
            "--allowed-origin",
            f"http://{ORIGIN_HOST}:{port}",
        ]
    if name.startswith("uvicorn"):
        return argv + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if name == "hypercorn":
        return argv + ["--bind", f"127.0.0.1:{port}", "--log-level", "WARNING"]
    if name == "daphne":
        return argv + ["-b", "127.0.0.1", "-p", str(port), "-v", "0"]
    raise ValueError(name)


def run(args, tmp: Path) -> list[Row]:
    sink_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "SQLITE_PATH": str(tmp / "bench.sqlite3"),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DEBUG": "0",
        "ALLOWED_HOSTS": ORIGIN_HOST,
        "SITE_URL": f"http://{ORIGIN_HOST}",
        "SECURE_SSL_REDIRECT": "0",
        "ALLOW_LOCAL_EMAIL_BACKEND": "1",  # sends no mail; DEBUG off wants it said
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        # 200 sessions of one bench user at once: lift the per-user and proxy caps.
        "CONSOLE_MAX_PER_USER": "1000",
        "CONSOLE_PROXY_MAX_CONNECTIONS": "1000",
    }
    env.pop("DATABASE_URL", None)
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    cast = setup_database(sink_port)

    from labs.consoles import tickets as consoles

    WsConn.cookie = f"sessionid={cast['session_key']}"
    WsConn.prefix = consoles.SUBPROTOCOL_PREFIX
    WsConn.vm_id = cast["vm"].pk

    def tickets() -> str:
        return consoles.ticket_issue(
            user=cast["user"], vm=cast["vm"], session_key=cast["session_key"], view_only=False
        )

    sink = Proc([sys.executable, __file__, "sink", str(sink_port)], env=env, log=tmp / "sink")
    sink.wait_listening(sink_port)
    rows = []
    for name in args.paths.split(","):
        row = Row(name)
        rows.append(row)
        if name == "raw":
            row.note = "TCP to the sink"
            client_run(measure(row, RawConn.open, sink_port, lambda: None, args, None))
            continue
        if name not in PATHS:
            row.errors.append("unknown path")
            continue
        module, _ = PATHS[name]
        python = sys.executable
        if not importable(python, module, env) and args.extra_python:
            python = args.extra_python
        if not importable(python, module, env):
            row.note = f"skipped: {module} not installed"
            continue
        row.note = "extra python" if python != sys.executable else ""
        port = free_port()
        server = Proc(server_argv(name, python, port), env=env, log=tmp / name)
        try:
            server.wait_listening(port)
            WsConn.compression = "deflate" if name == "uvicorn-deflate" else None
            print(f"measuring {name} …", file=sys.stderr, flush=True)
            client_run(measure(row, WsConn.open, port, tickets, args, server))
        except Exception as error:
            row.errors.append(f"{type(error).__name__}: {error}"[:300])
        finally:
            server.stop()
        if row.errors:
            log_tail = (tmp / name).read_text(errors="replace")[-600:]
            row.errors.append(f"server log tail: {log_tail}")
    return rows


def client_run(coro):
    """The client's own event loop: uvloop when installed, so the client is not the limit."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return asyncio.run(coro, loop_factory=uvloop.new_event_loop)


def fmt(value, digits=0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def print_table(rows: list[Row], args) -> None:
    raw = next((r for r in rows if r.path == "raw"), None)
    heads = [
        "path",
        "down MB/s",
        "up MB/s",
        "both MB/s",
        "RTT p50 µs",
        "RTT p99 µs",
        "+p50 µs",
        "CPU ms/MB",
        f"{args.sessions}× conn p99 ms",
        f"{args.sessions}× RTT p99 ms",
        f"{args.sessions}× MB/s",
        "PSS MB",
    ]
    table = []
    for r in rows:
        added = (
            r.rtt_p50 - raw.rtt_p50 if raw and raw.rtt_p50 and r.rtt_p50 and r is not raw else None
        )
        table.append(
            [
                r.path,
                fmt(r.down),
                fmt(r.up),
                fmt(r.both),
                fmt(r.rtt_p50),
                fmt(r.rtt_p99),
                fmt(added),
                fmt(r.cpu_ms_per_mb, 2),
                fmt(r.conn_p99),
                fmt(r.conc_rtt_p99, 1),
                fmt(r.conc_rate),
                fmt(r.pss_mb),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *table, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in table:
        cells = [line[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"{args.mb} MB = {args.mb * MB:,} bytes per one-session transfer (median of "
        f"{args.repeat}); RTT over "
        f"{args.rtts} round trips of {PING} bytes; {args.sessions} sessions: "
        f"{CONCURRENT_RTTS} round trips each at once, then {args.mb} MB split between them; "
        f"{os.cpu_count()} CPUs shared by client, server and sink."
    )
    for r in rows:
        if r.note:
            print(f"{r.path}: {r.note}")
        for error in r.errors:
            print(f"{r.path}: {error}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "sink":
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(sink_main(int(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rtts", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument(
        "--repeat", type=int, default=3, help="one-session transfers: the median of this many"
    )
    parser.add_argument("--paths", default=DEFAULT_PATHS)
    parser.add_argument("--extra-python", default="", help="python for servers not installed")
    args = parser.parse_args()
    if not (
        1 <= args.mb <= 2000
        and 1 <= args.rtts <= 100_000
        and 1 <= args.sessions <= 500
        and 1 <= args.repeat <= 10
    ):
        parser.error("--mb 1..2000, --rtts 1..100000, --sessions 1..500, --repeat 1..10")

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="stratus-bench-console-") as tmp:
        try:
            rows = run(args, Path(tmp))
        finally:
            Proc.stop_all()
        print_table(rows, args)


if __name__ == "__main__":
    main()
