"""NoCloud seed ISOs: what cloud-init finds on the CD-ROM of a new VM."""

import io
import json
import re

import pycdlib
import pytest

from labs.drivers import cloudinit
from labs.drivers.cloudinit import hostname_for, is_valid_username, seed_build, seed_read

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHo7lbC0mAaLTrL9cpUSNEKKzQsuEcsLtjzJX/XYbT0x alpha"
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def build(**overrides) -> bytes:
    values = {
        "instance_id": "5f0c3a7e9b2d4e1f",
        "hostname": "alpha-vm1",
        "login_user": "student",
        "extra_users": ["alice", "bob"],
        "ssh_public_key": KEY,
    }
    values.update(overrides)
    return seed_build(**values)


def user_data(iso: bytes) -> dict:
    text = seed_read(iso)["user-data"]
    first_line, _, rest = text.partition("\n")
    assert first_line == "#cloud-config"
    return json.loads(rest)


def meta_data(iso: bytes) -> dict:
    return json.loads(seed_read(iso)["meta-data"])


def test_the_seed_is_an_iso_labelled_cidata_with_meta_data_and_user_data():
    iso = build()

    assert iso[0x8001:0x8006] == b"CD001"  # ISO 9660 primary volume descriptor
    assert iso[0x8028:0x8048].rstrip() == b"cidata"  # what cloud-init's blkid looks for
    reader = pycdlib.PyCdlib()
    reader.open_fp(io.BytesIO(iso))
    try:
        assert reader.pvd.volume_identifier.rstrip() == b"cidata"
        joliet = sorted(
            child.file_identifier().decode("utf-16-be")
            for child in reader.list_children(joliet_path="/")
            if child.is_file()
        )
    finally:
        reader.close()
    assert joliet == ["meta-data", "user-data"]
    assert sorted(seed_read(iso)) == ["meta-data", "user-data"]


def test_meta_data_carries_the_instance_id_and_hostname():
    assert meta_data(build()) == {"instance-id": "5f0c3a7e9b2d4e1f", "local-hostname": "alpha-vm1"}


def test_every_user_gets_the_group_key_sudo_and_no_password():
    config = user_data(build())

    assert [user["name"] for user in config["users"]] == ["student", "alice", "bob"]
    for user in config["users"]:
        assert user["ssh_authorized_keys"] == [KEY]
        assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
        assert user["lock_passwd"] is True
        assert user["shell"] == "/bin/bash"


def test_the_guest_allows_no_passwords_no_root_and_reaches_out_to_nothing():
    config = user_data(build())

    assert config["ssh_pwauth"] is False
    assert config["disable_root"] is True
    assert config["package_update"] is False
    assert config["package_upgrade"] is False
    assert config["ntp"] == {"enabled": False}
    assert config["hostname"] == config["fqdn"] == "alpha-vm1"


def test_user_data_is_also_the_yaml_cloud_init_parses():
    yaml = pytest.importorskip("yaml")
    text = seed_read(build(hostname="Ünïcødé"))["user-data"]

    assert yaml.safe_load(text) == json.loads(text.partition("\n")[2])


def test_a_key_with_quotes_and_backslashes_cannot_break_out_of_user_data():
    key = 'ssh-ed25519 AAAA "}, {"name": "root"} \\ # :'
    config = user_data(build(ssh_public_key=key))

    assert [user["name"] for user in config["users"]] == ["student", "alice", "bob"]
    assert config["users"][0]["ssh_authorized_keys"] == [key]


def test_user_names_are_lower_cased_and_listed_once():
    config = user_data(build(login_user="student", extra_users=["Alice", "alice", "student"]))

    assert [user["name"] for user in config["users"]] == ["student", "alice"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpha-vm1", "alpha-vm1"),
        ("Alpha VM1", "alpha-vm1"),
        ("Alpha & Co / vm 1", "alpha-co-vm-1"),
        ("<script>alert(1)</script>", "script-alert-1-script"),
        ("x; rm -rf / #", "x-rm-rf"),
        ("Ünïcôdé Gröup", "unicode-group"),
        ("雪🚀", "vm"),
        ("---", "vm"),
        ("a" * 70 + "-b", "a" * 63),
    ],
)
def test_hostile_hostnames_become_dns_labels(text, expected):
    assert hostname_for(text) == expected
    assert DNS_LABEL.fullmatch(hostname_for(text))


def test_the_seed_sanitises_the_hostname_it_is_given():
    iso = build(hostname="Kernel Hackers' <VM>")

    assert meta_data(iso)["local-hostname"] == "kernel-hackers-vm"
    assert user_data(iso)["hostname"] == "kernel-hackers-vm"


@pytest.mark.parametrize(
    "name",
    [
        "root",
        "daemon",
        "systemd-oops",
        "9lives",
        "-dash",
        "two words",
        "bob@example.edu",
        "alice;rm",
        "x" * 33,
        "",
    ],
)
def test_user_names_linux_cannot_use_are_rejected(name):
    assert not is_valid_username(name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        build(extra_users=[name])


@pytest.mark.parametrize("name", ["alice", "Bob", "_svc", "a-b_c9", "x" * 32])
def test_ordinary_user_names_are_accepted(name):
    assert is_valid_username(name)
    assert cloudinit.username_for(name) == name.lower()


@pytest.mark.parametrize("key", ["", "   ", f"{KEY}\nssh-ed25519 AAAA second", f"{KEY}\rx"])
def test_the_key_must_be_exactly_one_line(key):
    with pytest.raises(ValueError, match="one non-empty line"):
        build(ssh_public_key=key)


@pytest.mark.parametrize("instance_id", ["", "a b", "x\ny", "i" * 129])
def test_an_unusable_instance_id_is_rejected(instance_id):
    with pytest.raises(ValueError, match="instance-id"):
        build(instance_id=instance_id)


HOSTILE_COMMENT = "alice@laptop 🚀 \u202e\u2066 \x7f \x85 \ufffe end"


def test_the_seed_is_valid_yaml_for_any_unicode_in_the_key_comment(make_public_key):
    """cloud-init reads the seed with PyYAML: an emoji (a surrogate pair in json.dumps'
    ASCII escapes) or a control character in the key's comment must not break it."""
    import yaml

    key = make_public_key(HOSTILE_COMMENT).strip()
    iso = seed_build(
        instance_id="i-1",
        hostname="Alpha 🚀",
        login_user="student",
        extra_users=["alice"],
        ssh_public_key=key,
    )
    files = seed_read(iso)
    user_data = yaml.load(files["user-data"], Loader=yaml.CSafeLoader)
    meta_data = yaml.load(files["meta-data"], Loader=yaml.CSafeLoader)
    assert meta_data["instance-id"] == "i-1"
    assert {tuple(u["ssh_authorized_keys"]) for u in user_data["users"]} == {(key,)}
