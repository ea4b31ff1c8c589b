"""Moving a real guest between two hypervisors on this machine, live and cold; the numbers.

    .venv/bin/python bench/migrate.py [--rounds 2] [--memory 1024] [--rtts 200] [--seconds 3]

The second hypervisor is scripts/second-libvirtd.sh's (a libvirtd of its own on 127.0.0.2,
started on a free port and stopped at the end), with an OpenSSH sshd in its mount namespace
on 127.0.0.2 (labs/tooling/second_host_sshd.py): the console channel a web process uses to
reach the VNC sockets of VMs on another host (labs/consoles/tunnel.py). One guest boots
from the project's base image on the machine's libvirt (TCG here), then, each round: moved
live to the second host while it runs, then shut down and moved cold back. It prints:

- for each move, the driver's timings: libvirt's own downtime and memory rounds for a live
  move, MiB copied for a cold one; for a live move, the seconds from the move's return
  until SSH answers through the destination's forward, and until the console answers
  through the SSH channel with a ServerInit naming the domain (the channel's SSH connection
  already open, as a web process keeps one per host);
- for a live move, the guest's own view: the longest gap between the stamps a guest process
  writes every 10 ms (CLOCK_REALTIME, read back after the move) inside the move's window
  and, for comparison, anywhere else in the round; and how far the guest's clock fell
  behind the host's across the move (guest `time.time()` against the host's around a round
  trip on one SSH session, the sample with the shortest round trip before and after; ±
  half those round trips), beside the same drift over the round's console measurement
  without a move (the control). Under TCG the guest's clock stops while QEMU is paused,
  so the stamps do not show the pause: the clock's lag is the pause as wall time;
- the console through each path, the guest on the first host (its vnc.sock opened
  directly) and then on the second (through the SSH channel): median time to open it up to
  ServerInit, the round trip of a non-incremental 1x1 FramebufferUpdateRequest (p50, p99),
  and full-screen raw updates one after another for SECONDS (MiB/s, updates/s); and
  remote/local. QEMU sends an update on its display refresh timer, not when asked, so
  both the update round trip and the full-screen rate are QEMU's pace more than the
  channel's; the channel's own cost shows in the time to open a console.

Loopback only; everything it made (domains, disks, pools, the second libvirtd, sshd) is
removed at the end, also when it fails or is interrupted, and it ends only what it started.
"""

import argparse
import asyncio
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMPS = "/dev/shm/stratus-bench-stamps"  # in the guest: tmpfs, gone with a reboot
# In the guest (python3 is there for cloud-init): a stamp every 10 ms, line-buffered.
STAMPER = (
    "import time\n"
    f"f = open({STAMPS!r}, 'a', buffering=1)\n"
    "while True:\n"
    "    f.write('%.6f\\n' % time.time())\n"
    "    time.sleep(0.01)\n"
)
# In the guest, on one SSH session: the guest's time for every line read.
CLOCK = "import sys, time\nfor _ in sys.stdin:\n    print('%.6f' % time.time(), flush=True)\n"


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def ssh_argv(key: Path, port: int, command: str) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR", "student@127.0.0.1", command,
    ]  # fmt: skip


def guest(key: Path, port: int, command: str) -> str:
    """``command`` run in the guest; its output (SystemExit when it fails)."""
    done = subprocess.run(ssh_argv(key, port, command), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"in the guest, {command!r} failed: {done.stderr.strip()}")
    return done.stdout


def ssh_answers(key: Path, port: int) -> bool:
    return (
        subprocess.run(ssh_argv(key, port, "true"), capture_output=True, timeout=30).returncode
        == 0
    )


def wait_ssh(key: Path, port: int, timeout: float, since: float | None = None) -> float:
    """Seconds from ``since`` (a time.monotonic(); default now) until SSH answers."""
    started = time.monotonic() if since is None else since
    while time.monotonic() - started < timeout:
        if ssh_answers(key, port):
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"no SSH on port {port} after {timeout:.0f} s")


def clock_offset(key: Path, port: int, samples: int = 30) -> tuple[float, float]:
    """(guest clock - host clock, the round trip it was read in), both in seconds: the
    sample with the shortest round trip on one SSH session."""
    proc = subprocess.Popen(
        ssh_argv(key, port, f"python3 -u -c {shlex.quote(CLOCK)}"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    best = (0.0, float("inf"))
    try:
        for i in range(samples + 3):
            before = time.time()
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            after = time.time()
            if not line:
                raise SystemExit("the guest's clock reader ended")
            if i >= 3 and after - before < best[1]:  # the first ones start python
                best = (float(line) - (before + after) / 2, after - before)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return best


def start_stamper(key: Path, port: int) -> None:
    guest(key, port, "command -v python3 >/dev/null")
    guest(
        key, port,
        f"rm -f {STAMPS}; setsid python3 -c {shlex.quote(STAMPER)} "
        f"</dev/null >/dev/null 2>&1 & echo $! > {STAMPS}.pid",
    )  # fmt: skip


def stamp_gaps(key: Path, port: int, window: tuple[float, float]) -> tuple[float, float, int]:
    """The longest gap between consecutive stamps (seconds) inside ``window`` (guest
    times) and outside it, and how many stamps there are; the stamper is stopped (by its
    PID) and its file removed."""
    text = guest(key, port, f"cat {STAMPS}; kill $(cat {STAMPS}.pid); rm -f {STAMPS}")
    stamps = [float(line) for line in text.split() if line]
    inside, outside = [0.0], [0.0]
    for a, b in zip(stamps, stamps[1:], strict=False):
        (inside if b >= window[0] and a <= window[1] else outside).append(b - a)
    return max(inside), max(outside), len(stamps)


class Loop:
    """An asyncio loop in a thread of its own, where the consoles are measured (as a web
    process, it keeps its SSH connection per host between consoles)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float = 300):
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        from labs.consoles import tunnel

        try:
            self.run(tunnel.close_all(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, default=1024, help="guest memory, MiB")
    parser.add_argument("--rtts", type=int, default=200, help="console round trips per path")
    parser.add_argument("--seconds", type=float, default=3.0, help="console throughput, s")
    parser.add_argument(
        "--image",
        default=str(Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images"))
                    / "debian-12.qcow2"),
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from dataclasses import replace

    from django.conf import settings

    from bench import rfb_client
    from labs.consoles import tunnel
    from labs.drivers import cloudinit
    from labs.drivers.base import VmSpec
    from labs.drivers.libvirt.driver import LibvirtDriver
    from labs.tooling import second_host_sshd

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)  # the clean-up below runs on a kill too

    run = secrets.token_hex(3)
    state = Path(f"/var/lib/stratus/bench-{run}-hv2-state")
    dirs = [Path(f"/var/lib/stratus/bench-{run}-hv1"), Path(f"/var/lib/stratus/bench-{run}-hv2")]
    for d in dirs:
        d.mkdir(parents=True, mode=0o755)
    key = dirs[0] / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    script = str(ROOT / "scripts" / "second-libvirtd.sh")
    env = {**os.environ, "SECOND_LIBVIRTD_PORT": str(free_port("127.0.0.2"))}
    sshd = None
    loop = None
    hosts = []
    specs = []
    try:
        uri = subprocess.run(
            [script, "start", str(state)], env=env, check=True, capture_output=True, text=True
        ).stdout.split()[-1]
        sshd = second_host_sshd.start(
            Path(f"/var/lib/stratus/bench-{run}-hv2-sshd"),
            daemon_pid=(state / "libvirtd.pid").read_text().strip(),
            log=dirs[0] / "sshd.log",
        )
        settings.CONSOLE_SSH_KEY = str(sshd.client_key)
        route = tunnel.SshRoute.parse(sshd.console_ssh, sshd.host_key)
        loop = Loop()
        hosts = [
            LibvirtDriver("qemu:///system", host_name="hv1"),
            LibvirtDriver(uri, host_name="hv2"),
        ]
        name = f"stratus-bench{run}-vm-1"
        base = VmSpec(
            name=name, uuid=str(uuid.uuid4()), title="bench", description="bench/migrate.py",
            vcpus=1, memory_mib=args.memory, disk_gib=4, base_image=args.image,
            storage_dir=str(dirs[0]), virt_type="qemu", ssh_port=free_port(),
        )  # fmt: skip
        specs = [base, replace(base, storage_dir=str(dirs[1]), ssh_port=free_port())]
        seed = cloudinit.seed_build(
            instance_id=uuid.uuid4().hex, hostname="bench", login_user="student",
            extra_users=[], ssh_public_key=key.with_suffix(".pub").read_text(),
        )  # fmt: skip

        def local(path: str):
            return lambda: asyncio.open_unix_connection(path)

        def remote(path: str):
            return lambda: tunnel.open_unix(route, path)

        def console_figures(opener):
            return loop.run(
                rfb_client.measure(opener, opens=20, round_trips=args.rtts, seconds=args.seconds)
            )

        # The web process keeps one SSH connection per host: open it as an earlier
        # console would have, so that the console's return is the channel's and QEMU's.
        loop.run(tunnel._connection(route))

        t0 = time.monotonic()
        hosts[0].provision(specs[0], seed_iso=seed)
        booted = wait_ssh(key, specs[0].ssh_port, 300)
        print(f"booted on hv1: SSH after {time.monotonic() - t0:.1f} s ({booted:.1f} s waiting)")
        print(
            "guest tools: "
            + " ".join(guest(key, specs[0].ssh_port, "which python3 perl awk || true").split())
        )
        consoles = []
        print(
            "move            total   paused  rounds  copied     SSH back  console  "
            "gap in move  elsewhere  clock lag   (without a move)"
        )
        for _ in range(args.rounds):
            start_stamper(key, specs[0].ssh_port)
            offset_start, rtt_start = clock_offset(key, specs[0].ssh_port)
            calm = time.monotonic()
            local_console = console_figures(local(hosts[0].console(name).path))
            offset_before, rtt_before = clock_offset(key, specs[0].ssh_port)
            calm_s = time.monotonic() - calm  # a control: the clock's drift without a move
            moving = time.time()
            timings = hosts[0].move_live(hosts[1], source=specs[0], target=specs[1], seed_iso=seed)
            moved = time.monotonic()
            moved_wall = time.time()
            endpoint = hosts[1].console(name)
            console_back = loop.submit(
                rfb_client.wait_desktop(remote(endpoint.path), endpoint.desktop_name, timeout=60)
            )
            hosts[0].delete(specs[0])
            back = wait_ssh(key, specs[1].ssh_port, 60, since=moved)
            console_s = console_back.result(60) - moved
            offset_after, rtt_after = clock_offset(key, specs[1].ssh_port)
            in_move, elsewhere, stamps = stamp_gaps(
                key, specs[1].ssh_port, (moving + offset_before, moved_wall + offset_after)
            )
            remote_console = console_figures(remote(endpoint.path))
            print(
                f"live hv1->hv2  {timings['migrate_s']:5.2f} s  "
                f"{timings.get('downtime_ms', float('nan')):5.0f} ms  "
                f"{timings.get('memory_iterations', 0):6.0f}  {'':9}  {back:5.2f} s  "
                f"{console_s:5.2f} s  {in_move * 1000:5.0f} ms  {elsewhere * 1000:5.0f} ms  "
                f"{(offset_before - offset_after) * 1000:5.0f} ms "
                f"± {(rtt_before + rtt_after) / 2 * 1000:.0f}  "
                f"{(offset_start - offset_before) * 1000:5.0f} ms "
                f"± {(rtt_start + rtt_before) / 2 * 1000:.0f} in {calm_s:.0f} s"
            )
            consoles.append((local_console, remote_console))
            hosts[1].shutdown(name, timeout=60)
            timings = hosts[1].copy_offline(
                hosts[0], source=specs[1], target=specs[0], seed_iso=seed
            )
            hosts[1].delete(specs[1])
            per_gib = timings["copy_s"] / max(timings["copied_mib"] / 1024, 1e-9)
            print(
                f"cold hv2->hv1  {timings['total_s']:5.2f} s  {'':8}  {'':6}  "
                f"{timings['copied_mib']:5.0f} MiB  ({per_gib:.2f} s/GiB)"
            )
            hosts[0].start(name)
            wait_ssh(key, specs[0].ssh_port, 300)
        print()
        print("console          screen       open   RTT p50  RTT p99     MiB/s  updates/s")
        for i, (near, far) in enumerate(consoles, 1):
            for label, c in ((f"{i} local (hv1)", near), (f"{i} remote (hv2)", far)):
                print(
                    f"{label:15}  {c.screen:11}  {c.open_ms:5.1f} ms  {c.rtt_p50_ms:5.1f} ms  "
                    f"{c.rtt_p99_ms:5.1f} ms  {c.mib_s:8.1f}  {c.updates_s:9.1f}"
                )
            print(
                f"{f'{i} remote/local':15}  {'':11}  {far.open_ms - near.open_ms:+5.1f} ms  "
                f"{far.rtt_p50_ms - near.rtt_p50_ms:+5.1f} ms  "
                f"{far.rtt_p99_ms - near.rtt_p99_ms:+5.1f} ms  "
                f"{far.mib_s / near.mib_s * 100:7.0f} %  "
                f"{far.updates_s / near.updates_s * 100:8.0f} %"
            )
    finally:
        if loop is not None:
            try:
                loop.close()
            except Exception as error:  # noqa: BLE001 - cleaning up: report and go on
                print(f"cleanup of the console channel: {error}")
        for host, spec in zip(hosts, specs, strict=False):
            try:
                host.delete(spec)
            except Exception as error:  # noqa: BLE001 - cleaning up: report and go on
                print(f"cleanup on {host.host}: {error}")
        for host in hosts:
            host.close()  # before its daemon stops: no "connection closed" warning
        if sshd is not None:
            sshd.stop()
        subprocess.run([script, "stop", str(state)], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
        for d in dirs:
            for pool in subprocess.run(
                ["virsh", "-q", "-c", "qemu:///system", "pool-list", "--all", "--name"],
                capture_output=True, text=True,
            ).stdout.split():  # fmt: skip
                xml = subprocess.run(
                    ["virsh", "-q", "-c", "qemu:///system", "pool-dumpxml", pool],
                    capture_output=True, text=True,
                ).stdout  # fmt: skip
                if f"<path>{d}</path>" in xml:
                    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "pool-destroy", pool])
                    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "pool-undefine", pool])
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
