"""Block volume hot-plug on a real guest: attach and detach times; the numbers.

    flock /tmp/stratus-heavy.lock .venv/bin/python bench/volumes.py [--rounds 5] [--port 24650]

One guest boots from the project's base image (/var/lib/stratus/images/debian-12.qcow2)
on the machine's libvirt (TCG), through the libvirt driver as a worker would, in a
storage directory of its own. A 1 GiB volume is made once, then, each round: attached to
the running guest (the driver's call, then until ``/dev/disk/by-id/virtio-SERIAL`` exists
in the guest, over SSH) and detached (the driver's call, which waits until the guest let
it go, then until the path is gone in the guest). It prints each round and the medians.

Loopback only (the guest's SSH forward on 127.0.0.1:PORT); the domain, its disks, the
volume and the storage directory are removed at the end, also when it fails.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()

from labs.drivers import cloudinit  # noqa: E402
from labs.drivers.base import VmSpec, VolumeSpec  # noqa: E402
from labs.drivers.libvirt import LibvirtDriver  # noqa: E402

IMAGE = Path(os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images")) / "debian-12.qcow2"


def ssh(key: Path, port: int, command: str) -> int:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
         "-o", "LogLevel=ERROR", "student@127.0.0.1", command],
        capture_output=True, timeout=30, check=False,
    ).returncode  # fmt: skip


def until(predicate, timeout: float, interval: float = 0.1) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=24650)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:6]
    storage = Path(f"/var/lib/stratus/bench-volumes-{run}")
    storage.mkdir(parents=True, mode=0o755)
    storage.chmod(0o755)
    tmp = Path(tempfile.mkdtemp())
    key = tmp / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    hv = LibvirtDriver("qemu:///system", host_name="local")
    spec = VmSpec(
        name=f"stratus-bench{run}-1", uuid=str(uuid.uuid4()), title="bench volumes",
        description="bench/volumes.py", vcpus=1, memory_mib=1024, disk_gib=4,
        base_image=str(IMAGE), storage_dir=str(storage), virt_type="qemu", ssh_port=args.port,
    )  # fmt: skip
    volume = VolumeSpec(
        file_name=f"stratus-bench{run}-volume-1.qcow2", serial=f"sv-b{run}", size_gib=1
    )
    path = f"/dev/disk/by-id/virtio-{volume.serial}"
    rows = []
    try:
        seed = cloudinit.seed_build(
            instance_id=run, hostname="bench", login_user="student", extra_users=[],
            ssh_public_key=key.with_suffix(".pub").read_text(),
        )  # fmt: skip
        started = time.monotonic()
        hv.provision(spec, seed_iso=seed)
        until(lambda: ssh(key, args.port, "true") == 0, timeout=300, interval=2)
        print(f"guest up (SSH) in {time.monotonic() - started:.1f} s")
        hv.volume_create(storage_dir=str(storage), volume=volume)
        for n in range(1, args.rounds + 1):
            attach = hv.volume_attach(spec.name, storage_dir=str(storage), volume=volume)
            seen = until(lambda: ssh(key, args.port, f"test -e {path}") == 0, timeout=60)
            detach = hv.volume_detach(spec.name, volume=volume, timeout=60)
            gone = until(lambda: ssh(key, args.port, f"test -e {path}") != 0, timeout=60)
            rows.append((attach, seen, detach, gone))
            print(
                f"round {n}: attach {attach:.3f} s, in the guest +{seen:.2f} s; "
                f"detach {detach:.3f} s, gone in the guest +{gone:.2f} s"
            )
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(
            f"median of {len(rows)}: attach {med[0]:.3f} s (+{med[1]:.2f} s to the guest), "
            f"detach {med[2]:.3f} s (+{med[3]:.2f} s)"
        )
    finally:
        hv.delete(spec)
        hv.volume_delete(storage_dir=str(storage), volume=volume)
        pool = hv._find_pool(os.path.normpath(str(storage)))
        if pool is not None:
            pool.destroy()
            pool.undefine()
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        hv.close()


if __name__ == "__main__":
    main()
