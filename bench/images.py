"""What course images cost: capture time per GiB (flatten, seal, store; plain and
compressed) and the import's check and copy times.

    .venv/bin/python bench/images.py [--gib 1] [--rounds 3] [--image PATH]

Real files, real tools, no guest: the "VM disk" is an overlay on the project's base image
(its ~440 MiB of real files) plus --gib GiB of random data written past the root
partition (random: the worst case for compression), captured by the same code as the
CAPTURE operation (labs/drivers/seal.py: qemu-img convert to raw, debugfs, qemu-img
convert to qcow2), and imported by the same checks as ``manage.py import_image``
(labs/drivers/qcow2.py). A running guest's file systems stay frozen only for the first
copy: that part is printed on its own. Everything is made in a temporary directory and
removed. Run it under the heavy lock: ``flock /tmp/stratus-heavy.lock .venv/bin/python
bench/images.py``.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labs.drivers import seal  # noqa: E402
from labs.drivers.qcow2 import standalone_copy, upload_check  # noqa: E402

GiB = 1024**3
CHUNK = 64 * 1024**2


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def make_disk(work: Path, base: Path, gib: int) -> tuple[Path, int]:
    """An overlay on ``base`` with ``gib`` GiB of random data after the root partition."""
    overlay = work / "vm.qcow2"
    base_size = 2 * GiB
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
         str(overlay), str(base_size + gib * GiB)], check=True,
    )  # fmt: skip
    if gib:
        noise = work / "noise.bin"
        with noise.open("wb") as f:
            f.write(os.urandom(CHUNK))
        commands = []
        for i in range(gib * GiB // CHUNK):
            commands += ["-c", f"write -q -s {noise} {base_size + i * CHUNK} {CHUNK}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(overlay)], check=True)
        noise.unlink()
    raw = work / "measure.raw"  # what the disk holds: the raw copy's allocated blocks
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(raw)], check=True
    )
    used = allocated(raw)
    raw.unlink()
    return overlay, used


def capture_once(overlay: Path, work: Path, *, compress: bool) -> tuple[float, float, int]:
    """(seconds reading the disk, total seconds, image bytes) of one capture."""
    dest = work / "image.qcow2"
    raw = Path(f"{dest}.raw")
    started = time.monotonic()
    seal.flatten(str(overlay), str(raw), fmt="raw")
    read = time.monotonic() - started
    raw.unlink()
    started = time.monotonic()
    seal.capture_file(str(overlay), str(dest), compress=compress)
    total = time.monotonic() - started
    size = dest.stat().st_size
    dest.unlink()
    return read, total, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=1, help="GiB of random data in the disk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--image",
        default=os.environ.get("STRATUS_IMAGE_DIR", "/var/lib/stratus/images")
        + "/debian-12.qcow2",
    )
    args = parser.parse_args()
    base = Path(args.image)
    with tempfile.TemporaryDirectory(prefix="bench-images-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for gib in sorted({0, args.gib}):
            overlay, used = make_disk(work, base, gib)
            print(f"disk: base image + {gib} GiB random data = {used / GiB:.2f} GiB allocated")
            for compress in (False, True):
                runs = [capture_once(overlay, work, compress=compress) for _ in range(args.rounds)]
                read = statistics.median(r[0] for r in runs)
                total = statistics.median(r[1] for r in runs)
                size = runs[0][2]
                print(
                    f"  capture {'compressed' if compress else 'plain     '}: total "
                    f"{total:5.1f} s ({total / (used / GiB):5.1f} s/GiB), disk read (the "
                    f"frozen part) {read:4.1f} s, image {size / 2**20:6.0f} MiB   "
                    f"[{', '.join(f'{r[1]:.1f}' for r in runs)}]"
                )
            overlay.unlink()
        for label, upload in (("base image (compressed qcow2)", base), ("1 GiB of data", None)):
            if upload is None:
                overlay, _ = make_disk(work, base, 1)
                upload = work / "upload.qcow2"
                seal.flatten(str(overlay), str(upload), fmt="qcow2")
                overlay.unlink()
            checks, copies = [], []
            for _ in range(args.rounds):
                started = time.monotonic()
                upload_check(str(upload), max_virtual_gib=64)
                checks.append(time.monotonic() - started)
                started = time.monotonic()
                standalone_copy(str(upload), str(work / "stored.qcow2"))
                copies.append(time.monotonic() - started)
                (work / "stored.qcow2").unlink()
            print(
                f"import of {label}, {upload.stat().st_size / 2**20:.0f} MiB: checks "
                f"{statistics.median(checks):.2f} s, copy into the store "
                f"{statistics.median(copies):.2f} s (medians of {args.rounds})"
            )


if __name__ == "__main__":
    main()
