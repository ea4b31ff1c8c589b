"""A captured disk's identity taken out of the file (labs/drivers/seal.py), on a real
partitioned ext4 disk made like the base image (sfdisk, mkfs.ext4 -d), no mounts."""

import subprocess
from pathlib import Path

import pytest

from labs.drivers.qcow2 import standalone_check
from labs.drivers.seal import SealError, capture_file

MiB = 2**20
OFFSET = MiB


def run(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, input=stdin, check=True, capture_output=True, text=True).stdout


def make_disk(tmp_path: Path, files: dict[str, str]) -> Path:
    """A 64 MiB MBR disk, one ext4 partition at 1 MiB holding ``files``, as qcow2."""
    root = tmp_path / "root"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(64 * MiB)
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw),
        stdin="label: dos\nstart=2048, type=83\n")  # fmt: skip
    run("mkfs.ext4", "-q", "-F", "-d", str(root), "-E", f"offset={OFFSET}", str(raw), "63M")
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk))
    raw.unlink()
    return disk


def guest_files(image: Path, tmp_path: Path) -> dict[str, str]:
    """Every regular file of the image's root, with its text (read through debugfs)."""
    raw = tmp_path / "check.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    fs = f"{raw}?offset={OFFSET}"
    found = {}
    for directory in ("/etc", "/etc/ssh", "/home/student/.ssh", "/root/.ssh", "/home/student"):
        for line in run("debugfs", "-R", f"ls -p {directory}", fs).splitlines():
            parts = line.split("/")
            if len(parts) >= 7 and parts[2].startswith("100"):
                path = f"{directory}/{parts[5]}"
                found[path] = run("debugfs", "-R", f"cat {path}", fs)
    raw.unlink()
    return found


IDENTITY = {
    "etc/ssh/ssh_host_ed25519_key": "PRIVATE HOST KEY",
    "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA host",
    "etc/ssh/ssh_host_ecdsa_key": "PRIVATE ECDSA KEY",
    "etc/ssh/sshd_config": "PasswordAuthentication no\n",
    "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    "etc/hostname": "source\n",
    "home/student/.ssh/authorized_keys": "ssh-ed25519 AAAA the-source-group\n",
    "home/student/notes.txt": "the instructor's prepared file\n",
    "root/.ssh/authorized_keys": "ssh-ed25519 AAAA root-key\n",
}


def test_a_capture_keeps_the_files_and_drops_the_host_keys_machine_id_and_logins(tmp_path):
    disk = make_disk(tmp_path, IDENTITY)
    out = tmp_path / "image.qcow2"
    sealed = capture_file(str(disk), str(out), compress=False)
    assert sealed.offset == OFFSET
    assert standalone_check(str(out))["virtual-size"] == 64 * MiB
    files = guest_files(out, tmp_path)
    assert not [p for p in files if "ssh_host_" in p]
    assert files["/etc/machine-id"] == ""
    assert "/home/student/.ssh/authorized_keys" not in files
    assert "/root/.ssh/authorized_keys" not in files
    assert files["/home/student/notes.txt"] == "the instructor's prepared file\n"
    assert files["/etc/ssh/sshd_config"] == "PasswordAuthentication no\n"
    assert files["/etc/hostname"] == "source\n"
    assert not (tmp_path / "image.qcow2.raw").exists()


def test_a_compressed_capture_is_sealed_too(tmp_path):
    disk = make_disk(tmp_path, IDENTITY)
    out = tmp_path / "image.qcow2"
    capture_file(str(disk), str(out), compress=True)
    files = guest_files(out, tmp_path)
    assert not [p for p in files if "ssh_host_" in p] and files["/etc/machine-id"] == ""


def test_a_disk_without_an_ext_root_is_not_captured(tmp_path):
    blank = tmp_path / "blank.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(blank), "16M")
    out = tmp_path / "image.qcow2"
    with pytest.raises(SealError, match="no ext2/3/4 root file system with /etc/ssh"):
        capture_file(str(blank), str(out), compress=False)
    assert not out.exists() and not (tmp_path / "image.qcow2.raw").exists()


def test_the_freeze_is_held_only_while_the_disk_is_read(tmp_path):
    disk = make_disk(tmp_path, IDENTITY)
    seen = []

    class Freeze:
        def __enter__(self):
            seen.append("frozen")

        def __exit__(self, *exc):
            seen.append(("thawed", (tmp_path / "image.qcow2.raw").exists()))

    capture_file(str(disk), str(tmp_path / "image.qcow2"), compress=False, frozen=Freeze())
    # Thawed once the raw copy existed, before the sealing and the final convert.
    assert seen == ["frozen", ("thawed", True)]
