"""Test hosts for group networks on one machine: each a libvirtd of its own in a network
and mount namespace that this module makes (scripts/second-libvirtd.sh with
SECOND_LIBVIRTD_NETNS), reached through its unix socket, the namespaces joined by a veth
pair whose two ends live in them (an underlay of its own, nothing routed out). Each
host's group networks, dnsmasq, VXLAN devices and its guests' SSH forwards are its
namespace's: SSH to a guest is ``ip netns exec <ns> ssh ...``. Nothing is made in the
machine's own namespace (DESIGN.md, Network safety).

For the group-network integration test and bench/network.py; needs root.

    hosts = [NetnsHost(run, "a", prefix), NetnsHost(run, "b", prefix)]
    for h in hosts: h.start()
    join(hosts, {"a": "10.254.0.1", "b": "10.254.0.2"})
    ...
    for h in hosts: h.stop()   # its guests, its libvirtd, what is left in it, by PID
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "second-libvirtd.sh")

# ICMP echo from a guest (the image has no ping): resolves its first argument, pings it
# three times (or as often as its third argument says) from the address in its second
# (optional, "" for any), prints the address and each round trip in ms; exit 1 when no
# reply came.
GUEST_PING = r"""
import os, socket, struct, sys, time
dst = socket.gethostbyname(sys.argv[1])
count = int(sys.argv[3]) if len(sys.argv) > 3 else 3
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
if len(sys.argv) > 2 and sys.argv[2]:
    s.bind((sys.argv[2], 0))
s.settimeout(1.5)
def csum(b):
    b += b"\0" * (len(b) % 2)
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
ident, rtts = os.getpid() & 0xFFFF, []
for seq in range(count):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"stratus"
    packet = struct.pack("!BBHHH", 8, 0, csum(body), ident, seq) + b"stratus"
    sent = time.monotonic()
    s.sendto(packet, (dst, 0))
    try:
        while True:
            data, addr = s.recvfrom(1500)
            if addr[0] == dst and data[20] == 0 and struct.unpack("!H", data[24:26])[0] == ident:
                rtts.append((time.monotonic() - sent) * 1000)
                break
    except socket.timeout:
        pass
print(dst, " ".join("%.2f" % r for r in rtts))
sys.exit(0 if rtts else 1)
"""


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def virsh_on(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True)


class NetnsHost:
    """One test host: a network namespace, a libvirtd in it, its state and VM dirs.
    ``run`` names this run (its namespaces and directories), ``prefix`` its domains."""

    def __init__(self, run_id: str, tag: str, prefix: str):
        self.tag = tag
        self.prefix = prefix
        self.netns = f"stx{run_id}{tag}"
        self.state = Path(f"/var/lib/stratus/test-{run_id}-ns{tag}-state")
        self.storage = Path(f"/var/lib/stratus/test-{run_id}-ns{tag}")
        self.uri = f"qemu+unix:///system?socket={self.state}/run/libvirt-sock"
        self.env = {**os.environ, "SECOND_LIBVIRTD_NETNS": self.netns}

    def start(self) -> None:
        run("ip", "netns", "add", self.netns)
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        self.storage.mkdir(parents=True, mode=0o755, exist_ok=True)
        self.storage.chmod(0o755)
        started = subprocess.run(
            [SCRIPT, "start", str(self.state)],
            capture_output=True,
            text=True,
            timeout=90,
            env=self.env,
        )
        if started.returncode != 0:
            raise RuntimeError(f"the libvirtd of {self.netns} did not start: {started.stderr}")
        if started.stdout.strip().splitlines()[-1] != self.uri:
            raise RuntimeError(f"the libvirtd of {self.netns} is not at {self.uri}")
        # Nothing of the machine's: no network at all (never libvirt's NAT network).
        if virsh_on(self.uri, "net-list", "--all", "--name").stdout.split():
            raise RuntimeError(f"the libvirtd of {self.netns} has networks of its own")

    def stop(self) -> None:
        """Everything it started, by PID: its guests, its libvirtd, what is left in the
        namespace (dnsmasq, QEMU), then the namespace (its veth end goes with it)."""
        for name in virsh_on(self.uri, "list", "--all", "--name").stdout.split():
            if name.startswith(self.prefix):
                virsh_on(self.uri, "destroy", name)
        subprocess.run(
            [SCRIPT, "stop", str(self.state)], capture_output=True, timeout=60, env=self.env
        )
        if Path(f"/run/netns/{self.netns}").exists():
            pids = run("ip", "netns", "pids", self.netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.storage, ignore_errors=True)

    def ssh(self, key: Path, port: int, command: str, *, input: str | None = None, timeout=30):
        return subprocess.run(
            [
                "ip", "netns", "exec", self.netns,
                "ssh", "-i", str(key), "-p", str(port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                "student@127.0.0.1", command,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip

    def wait_for_ssh(self, key: Path, port: int, *, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result = self.ssh(key, port, "hostname")
            except subprocess.TimeoutExpired:
                result = None
            if result is not None and result.returncode == 0:
                return result.stdout.strip()
            time.sleep(2)
        raise TimeoutError(f"SSH in {self.netns}:{port} did not answer in {timeout:.0f} s")


def join(hosts: list[NetnsHost], underlay: dict[str, str], run_id: str) -> None:
    """The hosts' namespaces joined by a veth pair made inside them, each end with its
    host's underlay address (a /24 of its own, routed nowhere)."""
    a, b = hosts
    run("ip", "-n", a.netns, "link", "add", f"vu{run_id}a", "type", "veth",
        "peer", "name", f"vu{run_id}b", "netns", b.netns)  # fmt: skip
    for host in hosts:
        device = f"vu{run_id}{host.tag}"
        run("ip", "-n", host.netns, "addr", "add", f"{underlay[host.tag]}/24", "dev", device)
        run("ip", "-n", host.netns, "link", "set", device, "up")
