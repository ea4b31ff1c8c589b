"""Shares in the libvirt driver: the domain XML (shared memory, one virtiofs filesystem
per share, defined on libvirt's test driver), the seed's mounts, and what a host prepares
before a domain with shares starts (the group directory, the course share's read-only
bind). The running guest: tests/integration/test_shares_on_a_guest.py."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import json
import os
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from labs.drivers import cloudinit
from labs.drivers.base import HypervisorError, ShareSpec
from labs.drivers.libvirt import shares as host_shares
from labs.drivers.libvirt.xml import build_domain_xml
from tests.drivers.test_libvirt import host, make_spec, seed  # noqa: F401 - fixtures

GROUP = ShareSpec(tag="group", source="/srv/shares/group-1", guest_path="/srv/group")
COURSE = ShareSpec(
    tag="course", source="/srv/shares/course-1/ro", guest_path="/srv/course", readonly=True
)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test or libvirt's test driver made


# --- the domain and the seed ----------------------------------------------------------------


def test_a_domain_with_shares_has_shared_memory_and_one_virtiofs_filesystem_each(make_spec):
    root = parse(
        build_domain_xml(
            make_spec(shares=(GROUP, COURSE)), overlay_path="/s/o.qcow2", seed_path="/s/s.iso"
        )
    )
    backing = root.find("memoryBacking")
    assert backing.find("source").get("type") == "memfd"
    assert backing.find("access").get("mode") == "shared"
    group, course = root.findall("devices/filesystem")
    assert group.attrib == {"type": "mount", "accessmode": "passthrough"}
    assert group.find("driver").get("type") == "virtiofs"
    assert (group.find("source").get("dir"), group.find("target").get("dir")) == (
        "/srv/shares/group-1",
        "group",
    )
    assert group.find("alias").get("name") == "ua-share-group"
    assert course.find("alias").get("name") == "ua-share-ro-course"  # bound read-only
    assert host_shares.domain_shares(root) == [
        ("group", "/srv/shares/group-1", False),
        ("course", "/srv/shares/course-1/ro", True),
    ]


def test_a_domain_without_shares_has_neither_shared_memory_nor_filesystems(make_spec):
    root = parse(build_domain_xml(make_spec(), overlay_path="/s/o.qcow2", seed_path="/s/s.iso"))
    assert root.find("memoryBacking") is None and root.find("devices/filesystem") is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tag": "Group"}, "tag"),
        ({"tag": "g r"}, "tag"),
        ({"source": "relative/dir"}, "source"),
        ({"source": "/srv/shares/../etc"}, "source"),
        ({"guest_path": "/srv/group/"}, "guest path"),
    ],
)
def test_unusable_share_specs_are_refused(values, message):
    with pytest.raises(HypervisorError, match=message):
        ShareSpec(**{"tag": "group", "source": "/s/g", "guest_path": "/srv/group", **values})


def test_the_seed_mounts_each_share_nosuid_nodev_noexec_and_the_course_one_read_only():
    iso = cloudinit.seed_build(
        instance_id="i-1",
        hostname="vm1",
        login_user="alice",
        extra_users=[],
        ssh_public_key="ssh-ed25519 AAAA k",
        mounts=(("group", "/srv/group", False), ("course", "/srv/course", True)),
    )
    user_data = cloudinit.seed_read(iso)["user-data"]
    assert "group /srv/group virtiofs rw,nosuid,nodev,noexec,nofail 0 0" in user_data
    assert "course /srv/course virtiofs ro,nosuid,nodev,noexec,nofail 0 0" in user_data
    runcmd = json.loads(user_data.removeprefix("#cloud-config\n"))["runcmd"]
    assert runcmd == [
        ["mkdir", "-p", "/srv/group", "/srv/course"],
        ["mount", "/srv/group"],
        ["mount", "/srv/course"],
    ]


def test_a_seed_refuses_a_share_path_that_would_break_the_fstab_line():
    with pytest.raises(ValueError, match="share"):
        cloudinit.seed_build(
            instance_id="i-1",
            hostname="vm1",
            login_user="alice",
            extra_users=[],
            ssh_public_key="ssh-ed25519 AAAA k",
            mounts=(("group", "/srv/group rw 0 0\n/dev/sda /x", False),),
        )


# --- the host side ----------------------------------------------------------------------------


def domain_with(make_spec, share: ShareSpec) -> ET.Element:
    """The domain XML Stratus defines for a VM with ``share`` (what the host side reads)."""
    xml = build_domain_xml(make_spec(shares=(share,)), overlay_path="/o", seed_path="/s")
    return parse(xml)


def test_the_host_makes_the_group_share_writable_for_every_guest_account(tmp_path, make_spec):
    source = str(tmp_path / "shares" / "group-1")
    root = domain_with(make_spec, replace(GROUP, source=source))
    host_shares.shares_prepare(root)
    assert stat.S_IMODE(os.stat(source).st_mode) == 0o777
    assert stat.S_IMODE(os.stat(tmp_path / "shares").st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="a bind mount needs root")
def test_the_host_binds_the_course_share_read_only_even_for_root(tmp_path, make_spec):
    source = str(tmp_path / "course-1" / "ro")
    root = domain_with(make_spec, replace(COURSE, source=source))
    try:
        host_shares.shares_prepare(root)
        host_shares.shares_prepare(root)  # again: the bind is there, nothing more is done
        (tmp_path / "course-1" / "files" / "a.txt").write_text("a")
        with open(os.path.join(source, "a.txt")) as f:
            assert f.read() == "a"
        with pytest.raises(OSError, match="Read-only file system"):
            (tmp_path / "course-1" / "ro" / "b.txt").write_text("b")
    finally:
        subprocess.run(["umount", source], check=False)
