"""PostgreSQL restarted under load: the web process's pool reconnects by itself, and no
request hangs while the database is away.

A private PostgreSQL cluster (its own data directory, its own port on 127.0.0.1, run as
the postgres user; the machine's server is never touched) holds a migrated Stratus
database. uvicorn serves it while four clients ask for a signed-in page in a loop. The
cluster is stopped for a few seconds and started again. Every request gets an answer
within the pool's timeout: the page, or a 503 that says the database is not answering
(never a 500, never a hang); once the cluster is back, the same web process (not
restarted) serves the page again within seconds.
"""

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import ROOT, RUN, AsgiServer, wait_for

pytestmark = [pytest.mark.integration]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POOL_TIMEOUT = 5  # seconds a request waits for a connection (DATABASE_POOL_TIMEOUT)
OUTAGE_SECONDS = 6
CLIENTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """A PostgreSQL cluster of this test's own, ended by its own pg_ctl."""

    def __init__(self) -> None:
        self.dir = Path(f"/tmp/stratus-pg-{RUN}")
        self.data, self.port = self.dir / "data", _free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/stratus"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700)
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres")

    def _as_postgres(self, *argv) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, argv)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        self._as_postgres(
            PG_BIN / "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.dir / "log",
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    if not (PG_BIN / "postgres").exists():
        pytest.skip("PostgreSQL 15's server binaries are not installed")
    pg = PrivateCluster()
    pg.start()
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(PG_BIN / "createdb"), "-h", "127.0.0.1"]
        + ["-p", str(pg.port), "stratus"],
        check=True,
        capture_output=True,
    )
    yield pg
    pg.remove()


def _manage(env: dict[str, str], *argv: str) -> str:
    return subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout


SESSION_FOR_A_STUDENT = """
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
user = get_user_model().objects.create_user("loadtester", password=None)
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
print(session.session_key)
"""


def _get(port: int, path: str, cookie: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=POOL_TIMEOUT + 30)
    try:
        conn.request("GET", path, headers={"Cookie": f"sessionid={cookie}"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.sqlite_pass_only
def test_postgres_restarted_under_load_the_pool_reconnects_and_nothing_hangs(cluster):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": cluster.url,
        "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    _manage(env, "migrate", "--no-input")
    cookie = _manage(env, "shell", "-c", SESSION_FOR_A_STUDENT).strip().splitlines()[-1]
    server = AsgiServer({"DATABASE_URL": cluster.url, "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT)})
    try:
        status, body = _get(server.port, "/", cookie)
        assert status == 200 and "loadtester" in body, (status, body[:300])

        answers: list[tuple[float, float, int, str]] = []  # start, seconds, status, body
        stop = threading.Event()

        def client():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, body = _get(server.port, "/", cookie)
                except OSError as error:  # the client's own timeout: a hung request
                    status, body = 0, repr(error)
                answers.append((started, time.monotonic() - started, status, body))
                time.sleep(0.05)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        down = time.monotonic()
        cluster.stop()
        time.sleep(OUTAGE_SECONDS)
        cluster.start()
        back = time.monotonic()
        # Served again, by the same process, within seconds of the database's return.
        wait_for(
            lambda: any(s == 200 and at > back for at, _, s, _ in answers[:]),
            timeout=15,
            interval=0.2,
            what="a page served after PostgreSQL came back",
        )
        recovered = min(at + took for at, took, s, _ in answers if s == 200 and at > back)
        time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join(timeout=POOL_TIMEOUT + 35)
    finally:
        server.stop()

    assert server.proc.returncode is not None
    statuses = {s for _, _, s, _ in answers}
    during = [a for a in answers if down < a[0] < back]
    assert during, "no request was made while the database was down"
    # No hang: every answer came within the pool's wait and a margin for the rest.
    slowest = max(took for _, took, _, _ in answers)
    assert slowest < POOL_TIMEOUT + 10, f"a request took {slowest:.1f} s"
    # The page, or the database's own 503 with its message; nothing else.
    assert statuses <= {200, 503}, statuses
    for _, _, status, body in answers:
        if status == 503:
            assert "database is not answering" in body, body[:300]
    assert any(s == 503 for _, _, s, _ in during), "the outage was never seen"
    # After the recovery every request is served.
    after = [s for at, _, s, _ in answers if at > recovered]
    assert after and set(after) == {200}, after
    print(
        f"\n{len(answers)} requests, {len(during)} during a {OUTAGE_SECONDS} s outage; "
        f"slowest {slowest:.2f} s; served again {recovered - back:.2f} s after the restart"
    )


A_GROUP_APPROVED = """
from django.contrib.auth import get_user_model
from labs.choices import OperationKind, Role
from labs.models import Course, Host, Image, Membership, Operation, Vm, VmTemplate
from labs.people.groups import group_approve, group_register
User = get_user_model()
course = Course.objects.create(slug="pg", title="PG")
image = Image.objects.create(name="deb", os="Debian 12", login_user="student", path=IMAGE)
VmTemplate.objects.create(course=course, image=image, vcpus=1, memory_mib=512, disk_gib=4)
Host.objects.create(
    name=HOST, uri="qemu:///system", vcpus=4, memory_mib=8192, disk_gib=100,
    virt_type="qemu", storage_dir=STORAGE, ssh_port_min=PORT, ssh_port_max=PORT + 9,
)
student = User.objects.create_user("pat")
Membership.objects.create(course=course, user=student)
teacher = User.objects.create_user("ivy")
Membership.objects.create(course=course, user=teacher, role=Role.INSTRUCTOR)
group = group_register(
    course=course, by=student, name="G", member_usernames=[], project_title="t",
    project_idea="i", ssh_public_key=KEY,
)
group_approve(group=group, by=teacher)
print(Operation.objects.get(vm__group=group, kind=OperationKind.PROVISION).pk)
"""


def _operation(url: str, pk: int) -> tuple[str, int, str]:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://"), connect_timeout=3) as db:
        return db.execute(
            "SELECT status, attempts, progress FROM labs_operation WHERE id = %s", (pk,)
        ).fetchone()


@pytest.mark.sqlite_pass_only
def test_postgres_down_under_a_running_operation_it_runs_again_once_it_is_back(
    cluster, storage_dir, group_keypair
):
    from .conftest import HOST_NAME, IMAGE_PATH, SSH_PORT_MIN, Worker

    _, public = group_keypair
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": cluster.url,
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    _manage(env, "migrate", "--no-input")
    script = (
        f"IMAGE = {str(IMAGE_PATH)!r}; HOST = {HOST_NAME!r}; STORAGE = {str(storage_dir)!r}\n"
        f"PORT = {SSH_PORT_MIN + 200}; KEY = {public!r}\n" + A_GROUP_APPROVED
    )
    op_id = int(_manage(env, "shell", "-c", script).strip().splitlines()[-1])
    # The worker pauses once the domain is defined; PostgreSQL goes down meanwhile and
    # stays down past the pause, so the operation's next write meets no database.
    worker = Worker(
        "",
        {"DATABASE_URL": cluster.url, "DATABASE_POOL_TIMEOUT": "3"},
    )
    worker.start(STRATUS_FAILPOINTS="provision:starting VM:8")
    try:
        wait_for(
            lambda: _operation(cluster.url, op_id)[2] == "starting VM",
            timeout=120,
            what="the provision to reach its pause",
        )
        cluster.stop()
        time.sleep(OUTAGE_SECONDS + 8)
        cluster.start()
        wait_for(
            lambda: _operation(cluster.url, op_id)[0] in ("succeeded", "failed"),
            timeout=240,
            what="the provision to end",
        )
        status, attempts, _ = _operation(cluster.url, op_id)
        log = worker.log.read_text()
    finally:
        worker.stop()
    assert status == "succeeded", log[-3000:]
    assert attempts == 2  # the first run met no database and was re-queued, not lost
    assert "the database went away" in log and "re-queued after the database came back" in log
    running = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True
    ).stdout.split()
    assert len([n for n in running if n.startswith(f"stratus-test{RUN}-vm-")]) == 1
