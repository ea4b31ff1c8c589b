"""Boot the base image N times under QEMU (TCG) and time each boot to a working SSH login.

    .venv/bin/python bench/boot_image.py [--image-dir DIR] [--boots N] [--keep-console DIR]

Builds the image first if it is missing (needs root; see labs/tooling/images.py). Each boot
gets a fresh qcow2 overlay on the read-only base and a NoCloud seed ISO that creates the user
``student`` with a throwaway key. The guest's only network is QEMU's user-mode stack with
``restrict=on`` and one forward from a free 127.0.0.1 port to its SSH port.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pycdlib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labs.tooling.images import image_build  # noqa: E402

DEFAULT_IMAGE_DIR = Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images"))
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
    "-o", "LogLevel=ERROR",
]  # fmt: skip


def main() -> None:
    args = _parse_args()
    base = image_build(name=args.name, dest_dir=args.image_dir)
    before = _sha256(base)
    print(f"base {base}\nsha256 before {before}")
    with tempfile.TemporaryDirectory(prefix="stratus-boot-") as tmp:
        key = _make_key(Path(tmp))
        times = [_timed_boot(base, key, run, args) for run in range(1, args.boots + 1)]
    after = _sha256(base)
    print(f"sha256 after  {after} ({'unchanged' if after == before else 'CHANGED'})")
    print(
        f"boot to SSH: {', '.join(f'{t:.1f}' for t in times)} s; "
        f"median {statistics.median(times):.1f} s"
    )
    if after != before:
        sys.exit("the base image changed")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    parser.add_argument("--name", default="debian-12")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--memory", type=int, default=1024, help="MiB")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    parser.add_argument("--keep-console", type=Path, help="save each serial log here")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="after each boot, print systemd-analyze blame from the guest",
    )
    return parser.parse_args()


def _timed_boot(base: Path, key: Path, run: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="stratus-boot-") as tmp:
        work = Path(tmp)
        overlay, seed = work / "overlay.qcow2", work / "seed.iso"
        _make_overlay(base, overlay)
        _write_seed(
            seed,
            instance_id=f"bench-{os.getpid()}-{run}",
            hostname=f"bench{run}",
            public_key=key.with_suffix(".pub").read_text().strip(),
        )
        port = _free_port()
        console = work / "console.log"
        started = time.monotonic()
        qemu = _start_qemu(overlay, seed, port, console, memory=args.memory)
        try:
            hostname = _wait_for_ssh(key, port, qemu, deadline=started + args.timeout)
            elapsed = time.monotonic() - started
            print(f"boot {run}: {elapsed:.1f} s to SSH (hostname {hostname})", flush=True)
            if args.analyze:
                _print_analysis(key, port)
        finally:
            _stop(qemu)
            if args.keep_console:
                args.keep_console.mkdir(parents=True, exist_ok=True)
                (args.keep_console / f"console-{run}.log").write_bytes(console.read_bytes())
    return elapsed


def _start_qemu(
    overlay: Path, seed: Path, port: int, console: Path, *, memory: int
) -> subprocess.Popen[bytes]:
    cmd = [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg",
        "-m", str(memory), "-smp", "1", "-nographic",
        "-drive", f"file={overlay},format=qcow2,if=virtio",
        "-drive", f"file={seed},format=raw,media=cdrom,if=ide,index=2,readonly=on",
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
    ]  # fmt: skip
    with console.open("wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _stop(qemu: subprocess.Popen[bytes]) -> None:
    """End our QEMU (and only it) by its PID."""
    qemu.terminate()
    try:
        qemu.wait(timeout=10)
    except subprocess.TimeoutExpired:
        qemu.kill()
        qemu.wait()


def _wait_for_ssh(key: Path, port: int, qemu: subprocess.Popen[bytes], *, deadline: float) -> str:
    while time.monotonic() < deadline:
        if qemu.poll() is not None:
            raise RuntimeError(f"QEMU exited with {qemu.returncode}")
        result = _ssh(key, port, "hostname")
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(0.25)
    raise TimeoutError("no SSH login before the deadline")


def _print_analysis(key: Path, port: int) -> None:
    script = (
        "while systemctl is-system-running 2>/dev/null | grep -q starting; do sleep 1; done; "
        "systemd-analyze; systemd-analyze blame | head -n 15; "
        "systemd-analyze critical-chain ssh.service"
    )
    print(_ssh(key, port, script, timeout=300).stdout, flush=True)


def _ssh(
    key: Path, port: int, command: str, *, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    cmd = ["ssh", "-i", str(key), "-p", str(port), *SSH_OPTIONS, "student@127.0.0.1", command]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 255, "", "timed out")


def _write_seed(path: Path, *, instance_id: str, hostname: str, public_key: str) -> None:
    meta_data = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"
    user_data = (
        "#cloud-config\n"
        "users:\n"
        "  - name: student\n"
        "    shell: /bin/bash\n"
        "    lock_passwd: true\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        f"    ssh_authorized_keys: {json.dumps([public_key])}\n"
    )
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in (("meta-data", meta_data), ("user-data", user_data)):
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/{name.upper().replace('-', '_')}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    iso.write(str(path))
    iso.close()


def _make_overlay(base: Path, overlay: Path) -> None:
    """A copy-on-write overlay: the guest writes here, never to the base image."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)])


def _make_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stratus-bench", "-f", str(key)])
    return key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
