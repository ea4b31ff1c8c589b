"""Build the base disk image students' VMs boot from.

A small Debian 12 cloud image is made from Debian packages with mmdebstrap, without loop
devices or mounts: the root file system is written by ``mkfs.ext4 -d`` straight into the
partition of a raw disk file, the MBR by ``sfdisk``, and GRUB's ``boot.img`` and a
``grub-mkimage`` core are written into the first MiB. The result is a compressed qcow2 that
overlays use as their read-only backing file. See docs/base-image.md.

Building needs root (mmdebstrap runs maintainer scripts in a chroot) and the Debian
packages in ``BUILD_PACKAGES``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

# Debian packages the build host needs (scripts/setup-system.sh installs them).
BUILD_PACKAGES: tuple[str, ...] = (
    "mmdebstrap",
    "debian-archive-keyring",
    "qemu-utils",
    "e2fsprogs",
    "fdisk",
    "grub-common",
)

SUITE = "bookworm"
MIRRORS: tuple[str, ...] = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)

# What goes into the guest, installed without recommends on top of the "apt" variant.
GUEST_PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "zstd",
    "grub-pc-bin",
    "systemd",
    "systemd-sysv",
    "libpam-systemd",
    "dbus",
    "udev",
    "kmod",
    "e2fsprogs",
    "netbase",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "openssh-server",
    "openssh-sftp-server",
    "cloud-init",
    "cloud-guest-utils",
    "qemu-guest-agent",
    "sudo",
    "procps",
    "less",
    "nano",
)

# Documentation, manual pages and translations are left out of the image.
DPKG_EXCLUDES: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# Units that would reach out, or spend boot time on nothing a lab VM needs.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily.service",
    "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service",
    "systemd-timesyncd.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "ifupdown-wait-online.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    # Early module loads and mounts for LVM, loop, FUSE, DRM, EFI, debugfs and friends: each
    # is a process on the way to SSH. The modules still load on first use of their /dev node.
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)
# Generators for things a VM disk made here never has (LUKS, dm-verity/integrity, GPT
# auto-discovery, hibernation, offline updates).
MASKED_GENERATORS: tuple[str, ...] = (
    "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-system-update-generator",
)
ENABLED_UNITS: dict[str, str] = {"stratus-ssh-hostkeys.service": "ssh.service"}

GUEST_FILES = Path(__file__).resolve().parents[2] / "scripts" / "guest" / "rootfs"

DISK_SIZE = 2 * 1024**3
SECTOR = 512
PART_START = 1024**2  # first MiB holds the MBR and GRUB's core image
KERNEL_ARGS = "ro console=tty1 console=ttyS0,115200n8 quiet"

Log = Callable[[str], object]


class ImageBuildError(Exception):
    """The base image could not be built; nothing was left at the destination."""


def image_build(*, name: str = "debian-12", dest_dir: Path, log: Log = print) -> Path:
    """Build ``<dest_dir>/<name>.qcow2`` unless it exists, and return its path.

    An existing image is never rebuilt in place: overlays depend on their backing file's
    exact content. To refresh the image, build it under a new name. The image is built in
    a temporary directory beside the destination and published with a link, so a failed
    or concurrent build never leaves a partial or replaced file.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / f"{name}.qcow2"
    if target.exists():
        log(f"{target} exists; not rebuilding")
        return target
    if os.geteuid() != 0:
        raise ImageBuildError("building the base image needs root (mmdebstrap uses chroot)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=dest_dir))
    try:
        image = _build_in(work, name=name, log=lambda msg: log(_stamp(started, msg)))
        _publish(image, target)
    finally:
        _remove_tree(work)
    size = target.stat().st_size / 1024**2
    log(_stamp(started, f"built {target} ({size:.0f} MiB)"))
    return target


def _build_in(work: Path, *, name: str, log: Log) -> Path:
    root, raw, image = work / "root", work / "disk.raw", work / f"{name}.qcow2"
    fs_uuid = str(uuid.uuid4())
    log(f"bootstrapping Debian {SUITE} with mmdebstrap")
    _bootstrap(root)
    log("configuring the guest")
    _configure(root, fs_uuid=fs_uuid)
    log("writing the disk: partition table, ext4, GRUB")
    _write_disk(root, raw, fs_uuid=fs_uuid)
    log("compressing to qcow2")
    _run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
    image.chmod(0o444)  # a base image is only ever a read-only backing file
    return image


def _stamp(started: float, msg: str) -> str:
    return f"[{time.monotonic() - started:5.1f}s] {msg}"


def _bootstrap(root: Path) -> None:
    args = [
        "mmdebstrap",
        "--mode=root",
        "--skip=chroot/mount",
        "--variant=apt",
        "--format=directory",
        '--aptopt=APT::Install-Recommends "false"',
        f"--include={','.join(GUEST_PACKAGES)}",
        f"--setup-hook=sync-in {GUEST_FILES} /",
        *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
        SUITE,
        str(root),
        *MIRRORS,
    ]
    _run(args)


def _configure(root: Path, *, fs_uuid: str) -> None:
    etc = root / "etc"
    (etc / "hostname").write_text("debian\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("")
    (etc / "machine-id").write_text("")  # each guest makes its own on first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()  # made per guest by stratus-ssh-hostkeys.service
    (etc / "fstab").write_text(f"UUID={fs_uuid}\t/\text4\trw,discard,errors=remount-ro\t0\t1\n")
    _set_units(etc / "systemd")
    _install_grub_files(root, fs_uuid=fs_uuid)


def _set_units(systemd_dir: Path) -> None:
    unit_dir = systemd_dir / "system"
    generator_dir = systemd_dir / "system-generators"
    generator_dir.mkdir(exist_ok=True)
    masks = [unit_dir / u for u in MASKED_UNITS] + [generator_dir / g for g in MASKED_GENERATORS]
    for link in masks:
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for unit, wanted_by in ENABLED_UNITS.items():
        wants = unit_dir / f"{wanted_by}.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


def _install_grub_files(root: Path, *, fs_uuid: str) -> None:
    for link in ("vmlinuz", "initrd.img"):
        if not (root / link).exists():
            raise ImageBuildError(f"/{link} missing from the guest; was the kernel installed?")
    grub = root / "boot" / "grub"
    shutil.copytree(root / "usr/lib/grub/i386-pc", grub / "i386-pc", dirs_exist_ok=True)
    (grub / "grub.cfg").write_text(
        "set default=0\n"
        "set timeout=0\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"\tlinux /vmlinuz root=UUID={fs_uuid} {KERNEL_ARGS}\n"
        "\tinitrd /initrd.img\n"
        "}\n"
    )


def _write_disk(root: Path, raw: Path, *, fs_uuid: str) -> None:
    with raw.open("wb") as disk:
        disk.truncate(DISK_SIZE)
    table = f"label: dos\nstart={PART_START // SECTOR}, type=83, bootable\n"
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], stdin=table)
    part_kib = (DISK_SIZE - PART_START) // 1024
    _run([
        "mkfs.ext4", "-q", "-F", "-L", "root", "-U", fs_uuid, "-d", str(root),
        "-E", f"offset={PART_START}", str(raw), f"{part_kib}k",
    ])  # fmt: skip
    _write_bootloader(root, raw)


def _write_bootloader(root: Path, raw: Path) -> None:
    """Put GRUB in the MBR (boot.img) and the gap before the partition (core.img)."""
    modules = root / "usr/lib/grub/i386-pc"
    core = raw.with_name("core.img")
    _run([
        "grub-mkimage", "-O", "i386-pc", "-d", str(modules), "-o", str(core),
        "-p", "(hd0,msdos1)/boot/grub", "biosdisk", "part_msdos", "ext2",
    ])  # fmt: skip
    core_bytes = core.read_bytes()
    if len(core_bytes) > PART_START - SECTOR:
        raise ImageBuildError(f"GRUB core image is {len(core_bytes)} bytes; too big")
    boot = (modules / "boot.img").read_bytes()
    with raw.open("r+b") as disk:
        disk.write(boot[:440])  # code only: keep the disk signature and partition table
        disk.seek(SECTOR)
        disk.write(core_bytes)


def _publish(image: Path, target: Path) -> None:
    try:
        os.link(image, target)  # fails rather than replace an image someone else published
    except FileExistsError:
        raise ImageBuildError(f"{target} appeared while building; left it alone") from None


def _remove_tree(path: Path) -> None:
    mounted = [p for p in path.rglob("*") if p.is_dir() and os.path.ismount(p)]
    if mounted:
        raise ImageBuildError(f"not removing {path}: {mounted[0]} is mounted")
    shutil.rmtree(path)


def _run(args: Sequence[str], *, stdin: str | None = None) -> None:
    exe = shutil.which(args[0])
    if exe is None:
        raise ImageBuildError(
            f"{args[0]} not found; install the Debian packages {' '.join(BUILD_PACKAGES)}"
        )
    result = subprocess.run(  # noqa: S603 - argument list, no shell
        [exe, *args[1:]], input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise ImageBuildError(f"{args[0]} failed ({result.returncode}): {tail}")
