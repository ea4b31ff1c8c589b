"""The console sshd of `make second-host` (labs/tooling/second_host_sshd.py) as the
Makefile drives it: ``start`` prints what register_host needs and leaves sshd running;
the channel it offers forwards to unix sockets and runs nothing; ``stop`` ends it."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from labs.tooling.second_host_sshd import main

pytestmark = pytest.mark.integration


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((address, port)) == 0


def _alive(pid: int) -> bool:
    """Running (a zombie is not: this test's process is its parent and has not reaped it;
    under make the starter has exited and init reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.sqlite_pass_only  # no database at all
def test_start_prints_the_console_route_and_stop_ends_it(tmp_path, capsys):
    home = tmp_path / "sshd"
    # This process's own mount namespace stands in for a second libvirtd's.
    main(["start", str(home), "--daemon-pid", str(os.getpid()), "--log", str(tmp_path / "log")])
    console_ssh, host_key, client_key = capsys.readouterr().out.splitlines()
    user_host, port = console_ssh.rsplit(":", 1)
    assert user_host == "root@127.0.0.2" and _listening("127.0.0.2", int(port))
    assert host_key.startswith("ssh-ed25519 ") and Path(client_key).exists()
    pid = int((home / "sshd.pid").read_text())

    # The key opens no shell and runs no command (restrict, command="/bin/false").
    ran = subprocess.run(
        ["ssh", "-i", client_key, "-p", port, "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "root@127.0.0.2",
         "echo reached"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "reached" not in ran.stdout and ran.returncode != 0

    main(["stop", str(home)])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and not home.exists()
    assert not _listening("127.0.0.2", int(port))
