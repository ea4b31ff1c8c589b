"""The checks an imported qcow2 passes before use, on real files made with qemu-img:
the hostile ones of LIBVIRT-NOTES ("hostile uploads") are refused naming the reason."""

import json
import struct
import subprocess
from pathlib import Path

import pytest

from labs.drivers.qcow2 import ImageRefused, standalone_check, standalone_copy, upload_check

SECRET = b"host-secret-" * 1000


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def host_file(tmp_path) -> Path:
    decoy = tmp_path / "shadow"
    decoy.write_bytes(SECRET)
    return decoy


def test_a_standalone_qcow2_within_the_limit_passes(good):
    info = upload_check(str(good), max_virtual_gib=1)
    assert info["virtual-size"] == 16 * 2**20


def test_a_qcow2_whose_backing_file_is_a_host_file_is_refused(tmp_path, host_file):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(evil), "1M")
    with pytest.raises(ImageRefused, match=f"names a backing file \\({host_file}\\)"):
        upload_check(str(evil), max_virtual_gib=1)


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path):
    evil = tmp_path / "datafile.qcow2"
    # data_file names a NEW file: never an existing one (qemu-img zeroes it).
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/new.data", str(evil), "1M"
    )
    with pytest.raises(ImageRefused, match="external data file"):
        upload_check(str(evil), max_virtual_gib=1)


def test_a_raw_file_called_qcow2_is_refused_without_being_probed(tmp_path, good):
    raw = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(good), str(raw))
    with pytest.raises(ImageRefused, match="not a qcow2 image"):
        upload_check(str(raw), max_virtual_gib=1)


def test_a_qcow2_larger_than_the_limit_is_refused(tmp_path):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "100G")
    with pytest.raises(ImageRefused, match="virtual size of 100.0 GiB; the limit is 64 GiB"):
        upload_check(str(big), max_virtual_gib=64)


def test_a_qcow2_with_a_corrupted_refcount_table_fails_the_check(good):
    with good.open("r+b") as f:
        f.seek(48)  # refcount_table_offset: far past the end of the file
        f.write(struct.pack(">Q", 0x7FFFFFFF0000))
    with pytest.raises(ImageRefused, match="failed qemu-img check"):
        upload_check(str(good), max_virtual_gib=1)


def test_a_qcow2_with_a_garbled_header_is_not_readable(good):
    with good.open("r+b") as f:
        f.seek(4)  # the version: 2 or 3 are the only ones
        f.write(struct.pack(">I", 99))
    with pytest.raises(ImageRefused, match="not a readable qcow2 image"):
        upload_check(str(good), max_virtual_gib=1)


def test_a_symlink_is_refused(tmp_path, good):
    link = tmp_path / "link.qcow2"
    link.symlink_to(good)
    with pytest.raises(ImageRefused, match="not a regular file"):
        upload_check(str(link), max_virtual_gib=1)


def test_the_copy_stands_alone_and_keeps_the_guest_data(tmp_path, good):
    copy = tmp_path / "copy.qcow2"
    standalone_copy(str(good), str(copy))
    assert standalone_check(str(copy))["virtual-size"] == 16 * 2**20
    raw = tmp_path / "copy.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(copy), str(raw))
    assert raw.read_bytes()[: 2**20] == b"A" * 2**20


def test_the_copy_cuts_the_backing_off_even_when_no_check_ran(tmp_path, host_file):
    """Defence in depth: a convert of a hostile file (as a plain ``qemu-img convert``
    would copy /etc/shadow into the output) reads nothing of the named file."""
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(evil), "1M")
    copy = tmp_path / "copy.qcow2"
    standalone_copy(str(evil), str(copy))
    raw = tmp_path / "copy.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(copy), str(raw))
    assert SECRET[:12] not in raw.read_bytes()
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "qcow2", str(copy)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "backing-filename" not in info


def test_the_copy_never_overwrites_a_file(tmp_path, good):
    there = tmp_path / "there.qcow2"
    there.write_bytes(b"keep me")
    with pytest.raises(ImageRefused, match="exists already"):
        standalone_copy(str(good), str(there))
    assert there.read_bytes() == b"keep me"
