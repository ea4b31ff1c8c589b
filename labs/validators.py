"""Validators for what people type, shared by models, forms and services."""

import ipaddress
import unicodedata
import urllib.parse

from django.core.exceptions import ValidationError

# Controls (Cc), format characters (Cf: bidi overrides and isolates, zero-width joiners),
# line and paragraph separators: none belongs in a one-line name, where they could forge
# a line in a log or an email header, or turn what a reviewer reads around.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def one_line_text(value: str) -> None:
    """A one-line text field: no control or direction-changing character."""
    for char in value or "":
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise ValidationError(
                "Use one line of plain text: U+%(point)04X (a control or direction-changing "
                "character) is not allowed here.",
                code="control_character",
                params={"point": ord(char)},
            )


def time_zone_name(value: str) -> None:
    """An IANA time zone name that this machine's zoneinfo knows ("Europe/Berlin")."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            "“%(value)s” is not a time zone name; use an IANA name such as Europe/Berlin or "
            "America/New_York.",
            code="time_zone",
            params={"value": value},
        ) from None


def guest_port_list(value: str) -> None:
    """Comma-separated TCP ports, 1-65535 each ("25, 111"); empty is an empty list."""
    bad = [
        item.strip()
        for item in value.split(",")
        if item.strip() and not (item.strip().isdigit() and 1 <= int(item.strip()) <= 65535)
    ]
    if bad:
        raise ValidationError(
            "“%(value)s” is not a port: list ports 1-65535 separated by commas (25, 111).",
            code="port_list",
            params={"value": bad[0][:20]},
        )


# The libvirt URIs Stratus drives a host through (docs/deploy.md, *The Host row*). libvirt
# would accept many more, and some run programs on the worker: the ext transport runs
# ?command=, and ssh's ?command=/?netcat=/?socket= choose what runs at either end. The
# worker holds the hypervisors' SSH key, so a URI is held to these, whoever enters it.
_LIBVIRT_SYSTEM = "/system"


def _is_loopback_name(name: str | None) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name or "").is_loopback
    except ValueError:
        return False


# Parameters each transport may carry, with the values they may take (None: any value).
_LIBVIRT_PARAMS: dict[str, dict[str, set[str] | None]] = {
    "qemu": {},
    "qemu+ssh": {
        "no_tty": {"0", "1"},
        "keyfile": None,
        "known_hosts": None,
        "known_hosts_verify": {"normal", "auto"},  # never "ignore"
        "sshauth": None,
        "mode": {"auto", "legacy", "direct"},
        "proxy": {"auto", "native"},  # never "netcat", which runs ?netcat=
    },
    "qemu+tls": {"pkipath": None, "tls_priority": None},
    "qemu+tcp": {},
    "test": {},
}
_RUNS_A_PROGRAM = {"command", "netcat", "socket"}
LIBVIRT_URI_HELP = (
    "qemu:///system on the worker's own machine, qemu+ssh://user@host/system or "
    "qemu+tls://host/system for another host, qemu+tcp://127.0.0.1/system only for a "
    "loopback test daemon, test:///default for tests."
)


def validate_libvirt_uri(value: str) -> None:
    """Refuse a libvirt URI whose transport Stratus does not support, or whose parameters
    would run a program or turn a check off, with a message naming the problem.

    One function on purpose: the checks run in the order a reader judges a URI (its
    characters, transport, server, credentials, path, parameters), each with its own
    message, and an allow-list is easiest to audit when it reads top to bottom.
    """
    if value != value.strip() or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValidationError("The URI has spaces or control characters.", code="uri_chars")
    parts = urllib.parse.urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in _LIBVIRT_PARAMS:
        raise ValidationError(
            f"Stratus does not drive hosts over {scheme or value!r}: use {LIBVIRT_URI_HELP}",
            code="uri_transport",
        )
    if parts.fragment:
        raise ValidationError("The URI has a #fragment.", code="uri_fragment")
    if parts.password is not None:
        raise ValidationError(
            "The URI carries a password: give the worker an SSH key or a TLS certificate.",
            code="uri_password",
        )
    if scheme in ("qemu", "test"):
        if parts.netloc:
            remote = "qemu+tls://" if scheme == "qemu" else "a local test:/// URI"
            raise ValidationError(
                f"{scheme}:// names no server here; for a remote host use {remote}.",
                code="uri_server",
            )
    elif not parts.hostname:
        raise ValidationError(f"{scheme}:// needs the host's name.", code="uri_server")
    if scheme == "qemu+tcp" and not _is_loopback_name(parts.hostname):
        raise ValidationError(
            "qemu+tcp:// is neither authenticated nor encrypted: only a loopback test daemon "
            "(127.0.0.0/8, such as scripts/second-libvirtd.sh's 127.0.0.2) may use it; use "
            "qemu+ssh:// or qemu+tls:// for another host.",
            code="uri_tcp",
        )
    if scheme == "test":
        if not (parts.path == "/default" or (len(parts.path) > 1 and parts.path[0] == "/")):
            raise ValidationError(
                "test:/// needs /default or a node file's path.", code="uri_path"
            )
    elif parts.path != _LIBVIRT_SYSTEM:
        raise ValidationError(
            f"Stratus drives libvirt's system instance: the path is /system, not "
            f"{parts.path or 'empty'!r}.",
            code="uri_path",
        )
    allowed = _LIBVIRT_PARAMS[scheme]
    for name, given in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name in _RUNS_A_PROGRAM:
            raise ValidationError(
                f"The URI parameter {name}= chooses a program for libvirt to run: "
                "Stratus does not allow it.",
                code="uri_param",
            )
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValidationError(
                f"The URI parameter {name}= is not one Stratus allows for {scheme}:// "
                f"(allowed: {known}).",
                code="uri_param",
            )
        values = allowed[name]
        if values is not None and given not in values:
            raise ValidationError(
                f"The URI parameter {name}={given} is not allowed "
                f"(one of: {', '.join(sorted(values))}).",
                code="uri_param",
            )
