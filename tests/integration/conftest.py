"""Real guests under QEMU (TCG here) on the local libvirtd, driven by a real Celery worker.

The worker is a subprocess that shares the test database (a SQLite file, or the
PostgreSQL test database) and consumes this run's own host queue on the real Redis.
Domains get a per-run name prefix and live in a per-run storage directory, so nothing
here touches a demo's VMs on the same machine.
"""

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.db import connection

from labs.choices import OperationStatus
from labs.models import Host, Image, Operation, VmTemplate
from tests.conftest import child_db_env

ROOT = Path(__file__).resolve().parents[2]
RUN = secrets.token_hex(3)
PREFIX = f"stratus-test{RUN}-vm-"
HOST_NAME = f"it{RUN}"
# SSH forwards of this run's guests: below Linux's ephemeral range (32768-60999), and
# movable (STRATUS_IT_SSH_PORTS=24400, or 24400-24499: the run takes 100 from the first)
# so that two runs on one machine do not collide.
SSH_PORT_MIN = int(os.environ.get("STRATUS_IT_SSH_PORTS", "24200").split("-")[0])
IMAGE_PATH = (
    Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images")) / "debian-12.qcow2"
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def base_image() -> Path:
    if not IMAGE_PATH.is_file():
        pytest.fail(f"{IMAGE_PATH} is missing: `make image` builds it (make test does).")
    return IMAGE_PATH


def _virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="session")
def storage_dir():
    path = Path(f"/var/lib/stratus/test-{RUN}")
    path.mkdir(parents=True, mode=0o755)
    path.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the overlays
    yield path
    # Whatever a failed test left behind: this run's domains, its pool, its files.
    for name in _virsh("list", "--all", "--name").stdout.split():
        if name.startswith(PREFIX):
            _virsh("destroy", name)
            _virsh("undefine", name, "--snapshots-metadata", "--managed-save")
    for line in _virsh("pool-list", "--all", "--name").stdout.split():
        if f"<path>{path}</path>" in _virsh("pool-dumpxml", line).stdout:
            _virsh("pool-destroy", line)
            _virsh("pool-undefine", line)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _domain_prefix(settings):
    settings.STRATUS_DOMAIN_PREFIX = PREFIX


@pytest.fixture(autouse=True)
def _no_guest_outlives_its_test(request):
    """A test that failed half-way leaves no guest running into the next one (its SSH
    forward would hold the port the next test's first VM gets): after each test, this
    run's domains are destroyed and undefined and their disks removed."""
    yield
    if "storage_dir" not in request.fixturenames or "one_guest" in request.fixturenames:
        return  # one_guest's module cleans up after its last test (test_one_guest.py)
    guests_remove(request.getfixturevalue("storage_dir"))


def guests_remove(storage: Path) -> None:
    """This run's domains destroyed and undefined, their disks removed."""
    for name in _virsh("list", "--all", "--name").stdout.split():
        if name.startswith(PREFIX):
            _virsh("destroy", name)
            _virsh("undefine", name, "--snapshots-metadata", "--managed-save")
            for leftover in storage.glob(f"{name}*"):
                leftover.unlink(missing_ok=True)
            _virsh("pool-refresh", _pool_of(storage))


def _pool_of(path: Path) -> str:
    for line in _virsh("pool-list", "--all", "--name").stdout.split():
        if f"<path>{path}</path>" in _virsh("pool-dumpxml", line).stdout:
            return line
    return ""


class Worker:
    """A real `celery worker` process on this run's host queue."""

    def __init__(self, db_name: str, extra_env: dict[str, str], host_name: str = ""):
        self.db_name = db_name
        self.extra_env = extra_env
        self.host_name = host_name or HOST_NAME
        self.proc: subprocess.Popen | None = None
        self.log = ROOT / "test-artifacts" / f"worker-{self.host_name}.log"

    def start(self, **env: str) -> None:
        self.log.parent.mkdir(exist_ok=True)
        environment = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "STRATUS_DOMAIN_PREFIX": PREFIX,
            "CHANNEL_LAYER_PREFIX": f"stratus-test{RUN}",
            **self.extra_env,
            **env,
        }
        environment.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        self.log.touch()
        logged = self.log.stat().st_size
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
                "-Q",
                f"host.{self.host_name}",
                "-n",
                f"{self.host_name}@localhost",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b"ready." in self.log.read_bytes()[logged:]:  # this start's, not an earlier
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"celery worker did not start; see {self.log}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.write_bytes(self.log.read_bytes() + b"\n--- killed ---\n")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _db_env() -> dict[str, str]:
    return child_db_env()


@pytest.fixture
def worker(transactional_db):
    w = Worker(connection.settings_dict["NAME"], _db_env())
    w.start()
    yield w
    w.stop()


@pytest.fixture
def qemu_host(transactional_db, storage_dir) -> Host:
    return qemu_host_row(storage_dir)


def qemu_host_row(storage_dir: Path) -> Host:
    """This machine's libvirtd as this run's host."""
    return Host.objects.create(
        name=HOST_NAME,
        uri="qemu:///system",
        vcpus=2,
        memory_mib=8192,
        disk_gib=100,
        virt_type="qemu",
        network_mode="user",
        # Below Linux's ephemeral range (32768-60999): a client socket that happened to get
        # a port there would keep QEMU from binding its forward to it.
        # Of the run's 100 ports: 80 for SSH, 20 for published ports (on the loopback too).
        ssh_port_min=SSH_PORT_MIN,
        ssh_port_max=SSH_PORT_MIN + 79,
        published_port_min=SSH_PORT_MIN + 80,
        published_port_max=SSH_PORT_MIN + 99,
        storage_dir=str(storage_dir),
    )


SECOND_HOST_NAME = f"hv2{RUN}"


def virsh_on(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def second_libvirtd():
    """A second hypervisor on this machine (scripts/second-libvirtd.sh: its own libvirtd
    in a private mount namespace on 127.0.0.2:16510), for this run; its URI."""
    import socket

    state = Path(f"/var/lib/stratus/test-{RUN}-hv2-state")
    script = str(ROOT / "scripts" / "second-libvirtd.sh")
    with socket.socket() as s:  # a port of its own: a demo's second libvirtd may run too
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    started = subprocess.run(
        [script, "start", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SECOND_LIBVIRTD_PORT": str(port)},
    )
    if started.returncode != 0:
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"the second libvirtd did not start: {started.stderr}")
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(
        [script, "stop", str(state)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "SECOND_LIBVIRTD_PORT": str(port)},
    )
    shutil.rmtree(state, ignore_errors=True)


def second_libvirtd_kill_and_start(uri: str) -> None:
    """The second host's libvirtd killed (SIGKILL: no shutdown of its own) and started
    again on the same state and port, as a host whose daemon crashed and was brought back;
    its QEMUs live on (they do not depend on libvirtd)."""
    state = Path(f"/var/lib/stratus/test-{RUN}-hv2-state")
    pid = int((state / "libvirtd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=20, what="libvirtd to die")
    port = urlsplit(uri).port
    started = subprocess.run(
        [str(ROOT / "scripts" / "second-libvirtd.sh"), "start", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SECOND_LIBVIRTD_PORT": str(port)},
    )
    assert started.returncode == 0, started.stderr


@pytest.fixture(scope="session")
def second_host_sshd(second_libvirtd):
    """OpenSSH's sshd on the second host (in its libvirtd's mount namespace, where its VNC
    sockets are), on 127.0.0.2 only, taking one key that may only open channels to unix
    sockets: the console channel of docs/console.md (labs/tooling/second_host_sshd.py).
    Returns (user@host:port, its host key line, the client key's path)."""
    from labs.tooling import second_host_sshd as sshd

    daemon_pid = Path(f"/var/lib/stratus/test-{RUN}-hv2-state/libvirtd.pid").read_text().strip()
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    try:
        server = sshd.start(
            Path(f"/var/lib/stratus/test-{RUN}-hv2-sshd"),
            daemon_pid=daemon_pid,
            log=ROOT / "test-artifacts" / f"sshd-{RUN}.log",
        )
    except RuntimeError as error:
        pytest.fail(f"sshd did not start ({error}); see test-artifacts/sshd-*.log")
    yield server.console_ssh, server.host_key, server.client_key
    server.stop()


@pytest.fixture
def second_storage_dir():
    path = Path(f"/var/lib/stratus/test-{RUN}-hv2")
    path.mkdir(parents=True, mode=0o755, exist_ok=True)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def second_host(transactional_db, second_libvirtd, second_storage_dir) -> Host:
    """The second hypervisor as a Host, with SSH ports of its own (both hosts forward on
    this machine's loopback). Its domains of this run are gone after the test."""
    host = Host.objects.create(
        name=SECOND_HOST_NAME,
        uri=second_libvirtd,
        vcpus=2,
        memory_mib=8192,
        disk_gib=100,
        virt_type="qemu",
        network_mode="user",
        ssh_port_min=SSH_PORT_MIN + 100,
        ssh_port_max=SSH_PORT_MIN + 179,
        published_port_min=SSH_PORT_MIN + 180,
        published_port_max=SSH_PORT_MIN + 199,
        storage_dir=str(second_storage_dir),
    )
    yield host
    for name in virsh_on(second_libvirtd, "list", "--all", "--name").stdout.split():
        if name.startswith(PREFIX):
            virsh_on(second_libvirtd, "destroy", name)
            virsh_on(second_libvirtd, "undefine", name, "--snapshots-metadata", "--managed-save")
    for line in virsh_on(second_libvirtd, "pool-list", "--all", "--name").stdout.split():
        virsh_on(second_libvirtd, "pool-destroy", line)
        virsh_on(second_libvirtd, "pool-undefine", line)


@pytest.fixture
def second_worker(transactional_db, second_host):
    """A real worker for the second host's queue (as each host runs its own)."""
    w = Worker(connection.settings_dict["NAME"], _db_env(), host_name=second_host.name)
    w.start()
    yield w
    w.stop()


@pytest.fixture
def debian_template(transactional_db, base_image, course) -> VmTemplate:
    return debian_template_row(course, base_image)


def debian_template_row(course, base_image: Path) -> VmTemplate:
    """The course's template: one VM of the base image, 1 vCPU, 1 GiB."""
    image = Image.objects.create(
        name="debian-12", os="Debian 12", login_user="student", path=str(base_image), size_gib=2
    )
    return VmTemplate.objects.create(
        course=course, image=image, count=1, vcpus=1, memory_mib=1024, disk_gib=4
    )


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_operation(op: Operation, *, timeout: float = 120) -> Operation:
    def done():
        op.refresh_from_db()
        return op.status in (OperationStatus.SUCCEEDED, OperationStatus.FAILED)

    wait_for(done, timeout=timeout, what=f"{op} to finish")
    assert op.status == OperationStatus.SUCCEEDED, f"{op}: {op.error}"
    return op


def ssh(
    key: Path,
    port: int,
    command: str,
    *,
    timeout: float = 20,
    user: str = "student",
    input: str | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(key),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            f"{user}@127.0.0.1",
            command,
        ],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_ssh(key: Path, port: int, *, timeout: float = 240) -> str:
    def attempt():
        try:
            result = ssh(key, port, "hostname")
        except subprocess.TimeoutExpired:
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    return wait_for(attempt, timeout=timeout, interval=2, what=f"SSH on 127.0.0.1:{port}")


def keypair(key: Path) -> tuple[Path, str]:
    """A fresh ed25519 key at ``key``: its path and its public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, key.with_suffix(".pub").read_text()


@pytest.fixture
def group_keypair(tmp_path) -> tuple[Path, str]:
    return keypair(tmp_path / "group_key")


class AsgiServer:
    """The project's ASGI server (uvicorn, as in the Procfile) on this run's database.

    ``stop()`` then ``start()`` is a server restart on the same port.
    """

    def __init__(self, extra_env: dict[str, str]):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ROOT / "test-artifacts" / f"asgi-{RUN}.log"
        self.log.parent.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "STRATUS_DOMAIN_PREFIX": PREFIX,
            "ALLOWED_HOSTS": "127.0.0.1",
            "CHANNEL_LAYER_PREFIX": f"stratus-test{RUN}",
            **extra_env,
        }
        self.env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log.touch()
        logged = self.log.stat().st_size
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "portal.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: b"Uvicorn running" in self.log.read_bytes()[logged:] or self.proc.poll(),
            timeout=30,
            what="uvicorn to start",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


@pytest.fixture
def asgi_server(transactional_db):
    server = AsgiServer(_db_env())
    yield server
    server.stop()


def approve_new_group(course, *, by, reviewer, name, public_key, members=()):
    """Sign up a group and approve it: returns its VM and the provision operation."""
    from labs.choices import OperationKind
    from labs.models import Vm
    from labs.people.groups import group_approve, group_register

    group = group_register(
        course=course,
        by=by,
        name=name,
        member_usernames=list(members),
        project_title="t",
        project_idea="i",
        ssh_public_key=public_key,
    )
    group_approve(group=group, by=reviewer)
    vm = Vm.objects.get(group=group)
    return vm, Operation.objects.get(vm=vm, kind=OperationKind.PROVISION)


@pytest.fixture
def server_channels(settings):
    """This process publishes where the server's consumers listen (the server and the
    worker share this run's channel-layer prefix; tests otherwise get a private one)."""
    layers = {**settings.CHANNEL_LAYERS}
    layers["default"] = {
        **layers["default"],
        "CONFIG": {**layers["default"]["CONFIG"], "prefix": f"stratus-test{RUN}"},
    }
    settings.CHANNEL_LAYERS = layers


def sign_in(browser, server: AsgiServer, user, password: str):
    """A new browser context signed in as ``user`` through the login form."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(server.url + "/accounts/login/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    return page


def live(page) -> None:
    """Wait until the page's events websocket is connected."""
    page.locator("[data-live-status][data-state='live']").wait_for()
