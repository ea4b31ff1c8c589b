"""OpenSSH's sshd on a second libvirtd of this machine (scripts/second-libvirtd.sh), the
console channel of docs/console.md as a hypervisor runs it: started in that daemon's mount
namespace (where its VNC sockets are), listening on its loopback address only, taking one
key that may only open channels (``restrict,port-forwarding``, no command, no TTY).

For the integration tests and the benches on one machine; never the system's sshd service.
It needs root (nsenter, and sshd reading the keys it is given).

    sshd = start(Path("/var/lib/stratus/x-hv2-sshd"), daemon_pid=pid, log=Path("sshd.log"))
    sshd.console_ssh, sshd.host_key, sshd.client_key   # what a Host row and the web need
    sshd.stop()                                         # ends it by its process group
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
NSENTER = "/usr/bin/nsenter"


@dataclass
class SecondHostSshd:
    home: Path
    address: str
    port: int
    host_key: str  # the server's public host key, "type base64" (a Host's console_ssh_host_key)
    client_key: Path  # the private key the server accepts (the web's CONSOLE_SSH_KEY)
    proc: subprocess.Popen

    @property
    def console_ssh(self) -> str:
        """``user@host:port``, a Host row's ``console_ssh``."""
        return f"root@{self.address}:{self.port}"

    def stop(self) -> None:
        """End sshd (and its per-connection children: its own process group) and remove
        its directory."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)
        shutil.rmtree(self.home, ignore_errors=True)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((address, port)) == 0


def start(
    home: Path,
    *,
    daemon_pid: int | str,
    log: Path,
    address: str = "127.0.0.2",
    timeout: float = 20,
) -> SecondHostSshd:
    """sshd in the mount namespace of the libvirtd whose PID is ``daemon_pid``, on a free
    port of ``address``, with its keys and configuration in ``home`` (made here; it must
    not exist) and its output appended to ``log``. RuntimeError when it does not listen
    within ``timeout`` seconds (it is stopped and ``home`` removed then)."""
    home.mkdir(mode=0o700, parents=True)
    for name in ("host_ed25519", "console_ed25519"):
        subprocess.run(  # noqa: S603 - argument list, no shell
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True
        )
    client = (home / "console_ed25519.pub").read_text().strip()
    (home / "authorized_keys").write_text(
        f'restrict,port-forwarding,command="/bin/false" {client}\n'
    )
    port = _free_port(address)
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress {address}\nHostKey {home}/host_ed25519\n"
        f"PidFile {home}/sshd.pid\nAuthorizedKeysFile {home}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        # OpenSSH lets a socket forward through only where local TCP forwards are allowed
        # too (one permission set for both): docs/deploy.md says what that means.
        "AllowTcpForwarding local\nAllowStreamLocalForwarding local\nX11Forwarding no\n"
        "PermitTTY no\nAllowAgentForwarding no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - argument list, no shell
            [NSENTER, "--target", str(daemon_pid), "--mount", "--", SSHD, "-D", "-e",
             "-f", str(home / "sshd_config")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    host_key = " ".join((home / "host_ed25519.pub").read_text().split()[:2])
    sshd = SecondHostSshd(
        home=home,
        address=address,
        port=port,
        host_key=host_key,
        client_key=home / "console_ed25519",
        proc=proc,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _listening(address, port):
            return sshd
        time.sleep(0.5)
    exited = proc.poll()
    sshd.stop()
    if exited is not None:
        raise RuntimeError(f"sshd exited ({exited}); see {log}")
    raise RuntimeError(f"sshd did not listen on {address}:{port} after {timeout:.0f} s; see {log}")


def stop_at(home: Path) -> None:
    """End the sshd ``start`` left running in ``home`` (from another process: its PID file
    names it, and only a process that is sshd is ended), and remove ``home``."""
    pid_file = home / "sshd.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        comm = Path(f"/proc/{pid}/comm")
        if pid > 1 and comm.exists() and comm.read_text().strip() == "sshd":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``start HOME --daemon-pid PID --log LOG``: print ``console_ssh``, then the host key,
    then the client key's path, a line each, and leave sshd running (``make second-host``);
    ``stop HOME``: end it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labs.tooling.second_host_sshd")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("home", type=Path)
    parser.add_argument("--daemon-pid", default="")
    parser.add_argument("--log", type=Path, default=Path("/dev/null"))
    args = parser.parse_args(argv)
    stop_at(args.home)  # a start replaces what an earlier one left
    if args.action == "start":
        if not args.daemon_pid:
            parser.error("start needs --daemon-pid")
        try:
            sshd = start(args.home, daemon_pid=args.daemon_pid, log=args.log)
        except RuntimeError as error:
            raise SystemExit(f"second host sshd: {error}") from None
        print(sshd.console_ssh, sshd.host_key, sshd.client_key, sep="\n")


if __name__ == "__main__":
    main()
