"""Moving a real guest between two hypervisors on this machine, live and cold; the numbers.

    .venv/bin/python bench/migrate.py [--rounds 2] [--memory 1024]

The second hypervisor is scripts/second-libvirtd.sh's (a libvirtd of its own on 127.0.0.2,
started on a free port and stopped at the end). One guest boots from the project's base
image on the machine's libvirt (TCG here), then, each round: moved live to the second
host while it runs, then shut down and moved cold back. For each move it prints the
driver's timings (libvirt's own downtime and memory rounds for a live move; MiB copied for
a cold one) and, for a live move, how long until SSH answers through the destination's
forward. Loopback only; everything it made is removed at the end, and it ends only what
it started.

Not measured here yet: the guest's own longest gap (a guest process stamping every 10 ms
read from the host; SSH does not survive a move under user-mode networking) and the
console's return (consoles of VMs on another host are not proxied yet).
"""

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def ssh_answers(key: Path, port: int) -> bool:
    return (
        subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR", "student@127.0.0.1", "true"],
            capture_output=True, timeout=30,
        ).returncode
        == 0
    )  # fmt: skip


def wait_ssh(key: Path, port: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ssh_answers(key, port):
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"no SSH on port {port} after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, default=1024, help="guest memory, MiB")
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

    from labs.drivers import cloudinit
    from labs.drivers.base import VmSpec
    from labs.drivers.libvirt.driver import LibvirtDriver

    run = secrets.token_hex(3)
    state = Path(f"/var/lib/stratus/bench-{run}-hv2-state")
    dirs = [Path(f"/var/lib/stratus/bench-{run}-hv1"), Path(f"/var/lib/stratus/bench-{run}-hv2")]
    for d in dirs:
        d.mkdir(parents=True, mode=0o755)
    key = dirs[0] / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    script = str(ROOT / "scripts" / "second-libvirtd.sh")
    env = {**os.environ, "SECOND_LIBVIRTD_PORT": str(free_port("127.0.0.2"))}
    uri = subprocess.run(
        [script, "start", str(state)], env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    hosts = [LibvirtDriver("qemu:///system", host_name="hv1"), LibvirtDriver(uri, host_name="hv2")]
    name = f"stratus-bench{run}-vm-1"
    base = VmSpec(
        name=name, uuid=str(uuid.uuid4()), title="bench", description="bench/migrate.py",
        vcpus=1, memory_mib=args.memory, disk_gib=4, base_image=args.image,
        storage_dir=str(dirs[0]), virt_type="qemu", ssh_port=free_port(),
    )  # fmt: skip
    specs = [base, replace(base, storage_dir=str(dirs[1]), ssh_port=free_port())]
    seed = cloudinit.seed_build(
        instance_id=uuid.uuid4().hex, hostname="bench", login_user="student", extra_users=[],
        ssh_public_key=key.with_suffix(".pub").read_text(),
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        hosts[0].provision(specs[0], seed_iso=seed)
        booted = wait_ssh(key, specs[0].ssh_port, 300)
        print(f"booted on hv1: SSH after {time.monotonic() - t0:.1f} s ({booted:.1f} s waiting)")
        print("move            total   paused  rounds  copied     SSH back")
        for _ in range(args.rounds):
            timings = hosts[0].move_live(hosts[1], source=specs[0], target=specs[1], seed_iso=seed)
            hosts[0].delete(specs[0])
            back = wait_ssh(key, specs[1].ssh_port, 60)
            print(
                f"live hv1->hv2  {timings['migrate_s']:5.2f} s  "
                f"{timings.get('downtime_ms', float('nan')):5.0f} ms  "
                f"{timings.get('memory_iterations', 0):6.0f}  {'':9}  {back:5.2f} s"
            )
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
    finally:
        for host, spec in zip(hosts, specs, strict=True):
            try:
                host.delete(spec)
            except Exception as error:  # noqa: BLE001 - cleaning up: report and go on
                print(f"cleanup on {host.host}: {error}")
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
