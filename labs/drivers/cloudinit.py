"""NoCloud seeds: the small ISO (label ``cidata``) cloud-init reads on a VM's first boot.

It carries ``meta-data`` (instance-id, hostname) and ``user-data`` (accounts with the
group's SSH key, passwordless sudo, no password logins, nothing that reaches out). Both
are written as JSON, which is valid YAML, so no YAML emitter is needed and no value can
break out of its quotes. A new instance-id makes cloud-init set the guest up again.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata

import pycdlib

VOLUME_LABEL = "cidata"
DEFAULT_SHELL = "/bin/bash"
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"

_USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Accounts the base system (Debian 12 + its packages) already has: cloud-init would add
# the group's key and sudo to them instead of creating a new user.
RESERVED_USERNAMES = frozenset(
    {
        "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news",
        "uucp", "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "_apt",
        "messagebus", "sshd", "polkitd", "systemd-network", "systemd-resolve",
        "systemd-timesync", "systemd-coredump", "tss", "uuidd", "tcpdump", "admin",
        "sudo", "adm", "staff", "users", "operator", "halt", "shutdown", "ftp",
    }
)  # fmt: skip
_FILES = {
    "meta-data": "/METADATA.;1",
    "user-data": "/USERDATA.;1",
    "network-config": "/NETWORKC.;1",
}
# QEMU's slirp network and the MAC its NIC has in every VM unless one is set.
SLIRP_MAC = "52:54:00:12:34:56"
SLIRP_ADDRESS, SLIRP_GATEWAY = "10.0.2.15/24", "10.0.2.2"


def hostname_for(text: str) -> str:
    """A valid DNS label from free text: "Alpha & Co / VM 1" -> "alpha-co-vm-1"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    label = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return label[:63].rstrip("-") or "vm"


def is_valid_username(name: str) -> bool:
    """Whether ``name`` (as given, after lower-casing) can be a new Linux account."""
    try:
        username_for(name)
    except ValueError:
        return False
    return True


def username_for(name: str) -> str:
    """``name`` as a Linux account name (lower-cased), or ValueError saying why not."""
    candidate = name.strip().lower() if isinstance(name, str) else ""
    if not _USERNAME_RE.fullmatch(candidate):
        raise ValueError(
            f"{name!r} cannot be a Linux user name: use a-z, 0-9, '_' and '-', "
            "starting with a letter or '_', at most 32 characters"
        )
    if candidate in RESERVED_USERNAMES or candidate.startswith("systemd-"):
        raise ValueError(f"{name!r} is a system account on the VM and cannot be used")
    return candidate


def seed_build(
    *,
    instance_id: str,
    hostname: str,
    login_user: str,
    extra_users: list[str],
    ssh_public_key: str,
    mounts: tuple[tuple[str, str, bool], ...] = (),
    network_config: dict | None = None,
) -> bytes:
    """The NoCloud seed ISO for one VM.

    ``hostname`` is made a DNS label with :func:`hostname_for`; user names are checked
    with :func:`username_for` (ValueError for one that cannot be used); duplicates are
    dropped. Every user gets the one SSH key and passwordless sudo; passwords are locked.

    ``mounts``: (virtiofs tag, guest path, read-only) of the VM's shares: each gets an
    /etc/fstab line (``nosuid,nodev,noexec``, ``ro`` for a read-only one, ``nofail`` so a
    missing share never stops a boot), mounted at once and by systemd at every boot.
    """
    if not _INSTANCE_ID_RE.fullmatch(instance_id or ""):
        raise ValueError("the instance-id must be 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'")
    key = (ssh_public_key or "").strip()
    if not key or "\n" in key or "\r" in key or "\x00" in key:
        raise ValueError("the SSH public key must be exactly one non-empty line")
    host = hostname_for(hostname)
    names: list[str] = []
    for name in [login_user, *extra_users]:
        username = username_for(name)
        if username not in names:
            names.append(username)

    meta_data = {"instance-id": instance_id, "local-hostname": host}
    user_data = {
        "hostname": host,
        "fqdn": host,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "users": [
            {
                "name": username,
                "ssh_authorized_keys": [key],
                "sudo": SUDO_RULE,
                "lock_passwd": True,
                "shell": DEFAULT_SHELL,
            }
            for username in names
        ],
        "ssh_pwauth": False,
        "disable_root": True,
        "package_update": False,
        "package_upgrade": False,
        "package_reboot_if_required": False,
        "ntp": {"enabled": False},
    }
    if mounts:
        fstab = "".join(_fstab_line(tag, path, readonly) for tag, path, readonly in mounts)
        user_data["write_files"] = [{"path": "/etc/fstab", "append": True, "content": fstab}]
        user_data["runcmd"] = [
            ["mkdir", "-p", *[path for _tag, path, _ro in mounts]],
            *[["mount", path] for _tag, path, _ro in mounts],
        ]
    files = {
        "meta-data": yaml_json(meta_data) + "\n",
        "user-data": "#cloud-config\n" + yaml_json(user_data) + "\n",
    }
    if network_config is not None:
        files["network-config"] = yaml_json(network_config) + "\n"
    return _iso(files)


_MOUNT_TAG_RE = re.compile(r"[a-z][a-z0-9-]{0,35}")
_MOUNT_PATH_RE = re.compile(r"(/[a-z0-9][a-z0-9_-]*)+")


def _fstab_line(tag: str, path: str, readonly: bool) -> str:
    if not _MOUNT_TAG_RE.fullmatch(tag) or not _MOUNT_PATH_RE.fullmatch(path):
        raise ValueError(f"a share is a-z tag and a plain absolute path, not {tag!r} {path!r}")
    options = ("ro" if readonly else "rw") + ",nosuid,nodev,noexec,nofail"
    return f"{tag} {path} virtiofs {options} 0 0\n"


def network_config_two_nics(*, group_mac: str, slirp_mac: str = "") -> dict:
    """NoCloud network-config (version 1, NICs matched by MAC) for a VM with a group NIC.

    cloud-init's fallback brings up one NIC only. The management NIC (slirp) gets its
    fixed address statically, so that only the group NIC's DHCP client writes
    /etc/resolv.conf: the group's dnsmasq then answers the VMs' names (``vm2``). The
    group network gives no default route (an isolated network's DHCP offers none).
    """
    return {
        "version": 1,
        "config": [
            {
                "type": "physical",
                "name": "slirp0",
                "mac_address": slirp_mac or SLIRP_MAC,
                "subnets": [
                    {"type": "static", "address": SLIRP_ADDRESS, "gateway": SLIRP_GATEWAY}
                ],
            },
            {
                "type": "physical",
                "name": "grp0",
                "mac_address": group_mac,
                # No "mtu" here: ifupdown takes no mtu option for a dhcp interface. The
                # guest gets it from the NIC (libvirt gives virtio the network's MTU) and
                # from DHCP (dnsmasq sends it).
                "subnets": [{"type": "dhcp"}],
            },
        ],
    }


def _yaml_printable(char: str) -> bool:
    """Whether YAML 1.1 (cloud-init's PyYAML) takes the character raw in a stream and
    keeps it (NEL, U+0085, is printable there but folds as a line break: escaped)."""
    point = ord(char)
    return (
        char in "\t\n\r"
        or 0x20 <= point <= 0x7E
        or 0xA0 <= point <= 0xD7FF
        or 0xE000 <= point <= 0xFFFD
        or 0x10000 <= point <= 0x10FFFF
    )


def yaml_json(value: object) -> str:
    """JSON that is also valid YAML for any Unicode.

    ``json.dumps``' default ASCII escapes write characters beyond the BMP as surrogate
    pairs (an emoji in a key comment: ``\\ud83d\\ude80``), which YAML refuses. So the text
    stays raw UTF-8, and only what YAML cannot carry raw is escaped (controls, U+FFFE);
    a lone surrogate, which no UTF-8 file can hold, becomes U+FFFD.
    """
    text = json.dumps(value, indent=2, ensure_ascii=False)
    out = []
    for char in text:
        if _yaml_printable(char):
            out.append(char)
        elif 0xD800 <= ord(char) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


def _iso(files: dict[str, str]) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    try:
        for name, text in files.items():
            data = text.encode()
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=_FILES[name],
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def seed_read(iso: bytes) -> dict[str, str]:
    """The files of a seed ISO by name (``meta-data``, ``user-data``), for tests and checks."""
    reader = pycdlib.PyCdlib()
    reader.open_fp(io.BytesIO(iso))
    try:
        files = {}
        for child in reader.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot() or not child.is_file():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            reader.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue().decode()
        return files
    finally:
        reader.close()
