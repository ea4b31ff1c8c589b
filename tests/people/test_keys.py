"""sshkey_parse against real keys from ssh-keygen, and against what students paste by mistake."""

import base64
import hashlib
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from labs.people.keys import SshKeyInfo, sshkey_parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "keys"
COMMENT = "student@laptop"


@dataclass(frozen=True)
class Listed:
    """What `ssh-keygen -l -f` prints for a key file."""

    bits: int
    fingerprint: str


def ssh_keygen(*args: str | Path) -> str:
    return subprocess.run(
        ["ssh-keygen", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


def ssh_keygen_list(path: Path) -> Listed:
    bits, fingerprint, *_ = ssh_keygen("-l", "-f", path).split()
    return Listed(bits=int(bits), fingerprint=fingerprint)


def wire_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def wire_mpint(value: int) -> bytes:
    # RFC 4251: two's complement, so a positive number whose top bit is set gets a 0x00 prefix.
    return wire_string(value.to_bytes(value.bit_length() // 8 + 1, "big"))


def key_line(key_type: str, blob: bytes, comment: str = COMMENT) -> str:
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}"


def blob_of(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


def refusal(text: str) -> ValidationError:
    with pytest.raises(ValidationError) as excinfo:
        sshkey_parse(text=text)
    return excinfo.value


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private key files written by ssh-keygen; each has its .pub next to it."""
    folder = tmp_path_factory.mktemp("keys")
    specs = {
        "ed25519": ["-t", "ed25519"],
        "ecdsa256": ["-t", "ecdsa", "-b", "256"],
        "ecdsa384": ["-t", "ecdsa", "-b", "384"],
        "ecdsa521": ["-t", "ecdsa", "-b", "521"],
        "rsa2048": ["-t", "rsa", "-b", "2048"],
        "rsa4096": ["-t", "rsa", "-b", "4096"],
        "rsa_pem": ["-t", "rsa", "-b", "2048", "-m", "PEM"],
        "ecdsa_pem": ["-t", "ecdsa", "-m", "PEM"],
        "ecdsa_pkcs8": ["-t", "ecdsa", "-m", "PKCS8"],
        "ca": ["-t", "ed25519"],
    }
    paths = {}
    for name, options in specs.items():
        paths[name] = folder / name
        ssh_keygen("-q", *options, "-N", "", "-C", COMMENT, "-f", paths[name])
    return paths


def public(path: Path) -> str:
    return path.with_suffix(".pub").read_text()


@pytest.mark.parametrize(
    "name", ["ed25519", "ecdsa256", "ecdsa384", "ecdsa521", "rsa2048", "rsa4096"]
)
def test_it_reads_a_key_as_ssh_keygen_lists_it(keys: dict[str, Path], name: str) -> None:
    pub = keys[name].with_suffix(".pub")
    listed = ssh_keygen_list(pub)

    key = sshkey_parse(text=pub.read_text())

    assert key.fingerprint == listed.fingerprint
    assert key.bits == listed.bits
    assert key.comment == COMMENT
    assert key.line == pub.read_text().strip()
    assert key.type == key.line.split()[0]


def test_it_names_the_type_and_size_of_each_kind_of_key(keys: dict[str, Path]) -> None:
    seen = {
        name: (key.type, key.bits)
        for name in ["ed25519", "ecdsa256", "ecdsa384", "ecdsa521", "rsa2048", "rsa4096"]
        for key in [sshkey_parse(text=public(keys[name]))]
    }

    assert seen == {
        "ed25519": ("ssh-ed25519", 256),
        "ecdsa256": ("ecdsa-sha2-nistp256", 256),
        "ecdsa384": ("ecdsa-sha2-nistp384", 384),
        "ecdsa521": ("ecdsa-sha2-nistp521", 521),
        "rsa2048": ("ssh-rsa", 2048),
        "rsa4096": ("ssh-rsa", 4096),
    }


@pytest.mark.parametrize(
    ("filename", "key_type"),
    [
        ("sk-ssh-ed25519.pub", "sk-ssh-ed25519@openssh.com"),
        ("sk-ecdsa-sha2-nistp256.pub", "sk-ecdsa-sha2-nistp256@openssh.com"),
    ],
)
def test_it_accepts_security_key_backed_keys(filename: str, key_type: str) -> None:
    text = (FIXTURES / filename).read_text()
    expected = base64.b64encode(hashlib.sha256(blob_of(text)).digest()).decode().rstrip("=")

    key = sshkey_parse(text=text)

    assert key == SshKeyInfo(
        type=key_type,
        bits=256,
        fingerprint=f"SHA256:{expected}",
        comment="student@yubikey",
        line=text.strip(),
    )
    assert ssh_keygen_list(FIXTURES / filename) == Listed(256, key.fingerprint)


@pytest.mark.parametrize(
    "variant",
    [
        "{type} {data} {comment}\n",
        "{type} {data} {comment}\r\n",
        "  \n\t{type} {data} {comment}  \n\n",
        "{type}\t{data}    {comment}",
    ],
)
def test_it_accepts_surrounding_whitespace_and_a_trailing_newline(
    keys: dict[str, Path], variant: str
) -> None:
    key_type, data, _ = public(keys["ed25519"]).split()

    key = sshkey_parse(text=variant.format(type=key_type, data=data, comment=COMMENT))

    assert key.line == f"{key_type} {data} {COMMENT}"
    assert key.comment == COMMENT


def test_it_keeps_a_comment_with_spaces_joined_by_single_spaces(keys: dict[str, Path]) -> None:
    key_type, data, _ = public(keys["ed25519"]).split()

    key = sshkey_parse(text=f"{key_type} {data}  Jane   Doe's laptop")

    assert key.comment == "Jane Doe's laptop"
    assert key.line == f"{key_type} {data} Jane Doe's laptop"


def test_it_accepts_a_key_without_comment(keys: dict[str, Path]) -> None:
    key_type, data, _ = public(keys["ed25519"]).split()

    key = sshkey_parse(text=f"{key_type} {data}\n")

    assert key.comment == ""
    assert key.line == f"{key_type} {data}"


def test_it_rejects_an_rsa_key_shorter_than_2048_bits(tmp_path: Path) -> None:
    path = tmp_path / "rsa1024"
    try:
        ssh_keygen("-q", "-t", "rsa", "-b", "1024", "-N", "", "-C", COMMENT, "-f", path)
        text = public(path)
    except subprocess.CalledProcessError:  # newer OpenSSH refuses to make one: build it
        modulus = secrets.randbits(1024) | (1 << 1023) | 1
        text = key_line(
            "ssh-rsa", wire_string(b"ssh-rsa") + wire_mpint(65537) + wire_mpint(modulus)
        )

    error = refusal(text)

    assert error.code == "rsa_too_short"
    assert "only 1024 bits; at least 2048" in error.messages[0]
    assert "ssh-keygen -t ed25519" in error.messages[0]


def test_it_rejects_a_dsa_key() -> None:
    numbers = [secrets.randbits(1024) | 1 for _ in range(4)]  # p, q, g, y
    blob = wire_string(b"ssh-dss") + b"".join(wire_mpint(n) for n in numbers)

    error = refusal(key_line("ssh-dss", blob))

    assert error.code == "dsa"
    assert "DSA keys (ssh-dss) are no longer secure" in error.messages[0]


@pytest.mark.parametrize("name", ["ed25519", "rsa_pem", "ecdsa_pem", "ecdsa_pkcs8"])
def test_it_rejects_a_private_key_pasted_as_public(keys: dict[str, Path], name: str) -> None:
    error = refusal(keys[name].read_text())

    assert error.code == "private_key"
    assert "This is a private key. Never share it" in error.messages[0]
    assert ".pub" in error.messages[0]


def test_it_rejects_an_encrypted_pkcs8_private_key(tmp_path: Path) -> None:
    path = tmp_path / "locked"
    ssh_keygen("-q", "-t", "ecdsa", "-m", "PKCS8", "-N", "correct horse", "-f", path)
    assert "BEGIN ENCRYPTED PRIVATE KEY" in path.read_text()

    error = refusal(path.read_text())

    assert error.code == "private_key"
    assert "Never share it" in error.messages[0]


def test_it_rejects_a_putty_private_key_and_says_where_the_public_one_is() -> None:
    ppk = (
        "PuTTY-User-Key-File-3: ssh-ed25519\n"
        "Encryption: none\n"
        "Comment: eddsa-key-20250101\n"
        "Public-Lines: 2\n"
        "AAAAC3NzaC1lZDI1NTE5AAAAIP2zS313qO0YuTx2SdnzTIXkGAJOWDTApkUoGxrx\n"
        "FPQn\n"
        "Private-Lines: 1\n"
        "AAAAIEq0X1Kx3vUq6cwz8n0KzC7rZBvX9tWmHh2l3v0pKk1X\n"
        "Private-MAC: 0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n"
    )

    error = refusal(ppk)

    assert error.code == "private_key"
    assert "PuTTY private key (.ppk). Never share it" in error.messages[0]
    assert "PuTTYgen" in error.messages[0]


def test_it_rejects_two_keys_on_two_lines(keys: dict[str, Path]) -> None:
    error = refusal(public(keys["ed25519"]) + public(keys["rsa2048"]))

    assert error.code == "multiple_keys"
    assert "Paste only one key: this contains 2 keys" in error.messages[0]


def test_it_rejects_a_key_split_over_two_lines(keys: dict[str, Path]) -> None:
    line = public(keys["rsa2048"])

    error = refusal(line[:200] + "\n" + line[200:])

    assert error.code == "not_one_line"
    assert "must be on a single line" in error.messages[0]


@pytest.mark.parametrize(
    "options",
    [
        'command="/usr/bin/uptime"',
        'command="echo hello world"',
        'no-pty,from="10.0.0.0/8"',
        "restrict",
    ],
)
def test_it_rejects_authorized_keys_options_before_the_type(
    keys: dict[str, Path], options: str
) -> None:
    error = refusal(f"{options} {public(keys['ed25519'])}")

    assert error.code == "key_options"
    assert "Remove the options in front of the key type" in error.messages[0]


@pytest.mark.parametrize("name", ["ed25519", "ecdsa384", "rsa2048"])
@pytest.mark.parametrize("cut", [10, 12])
def test_it_rejects_a_truncated_key(keys: dict[str, Path], name: str, cut: int) -> None:
    key_type, data, comment = public(keys[name]).split()

    error = refusal(f"{key_type} {data[:-cut]} {comment}")

    assert error.code == "damaged"
    assert "incomplete or damaged" in error.messages[0]


@pytest.mark.parametrize(
    "data",
    [
        "not*base64!!",
        "AAAAC3NzaC1lZDI1NTE5AAAAI P2zS",
        base64.b64encode(b"hello world, this is not a key at all").decode(),
    ],
)
def test_it_rejects_garbage_instead_of_key_data(data: str) -> None:
    error = refusal(f"ssh-ed25519 {data} {COMMENT}")

    assert error.code == "damaged"
    assert "Copy the whole line from your .pub file again" in error.messages[0]


def test_it_rejects_a_type_with_no_key_data() -> None:
    error = refusal("ssh-ed25519")

    assert error.code == "damaged"
    assert "incomplete or damaged" in error.messages[0]


def test_it_rejects_a_line_whose_type_disagrees_with_the_key(keys: dict[str, Path]) -> None:
    _, data, comment = public(keys["ed25519"]).split()

    error = refusal(f"ssh-rsa {data} {comment}")

    assert error.code == "type_mismatch"
    assert "(ssh-rsa) does not match the key itself (ssh-ed25519)" in error.messages[0]


def test_it_rejects_an_unknown_key_type() -> None:
    blob = wire_string(b"ssh-xmss@openssh.com") + wire_string(secrets.token_bytes(64))

    error = refusal(key_line("ssh-xmss@openssh.com", blob))

    assert error.code == "unknown_type"
    assert "“ssh-xmss@openssh.com” is not a key type Stratus accepts" in error.messages[0]


def test_it_rejects_a_certificate(keys: dict[str, Path]) -> None:
    ssh_keygen("-q", "-s", keys["ca"], "-I", "student", "-n", "student", keys["ed25519"])
    cert = keys["ed25519"].with_name("ed25519-cert.pub").read_text()
    assert cert.startswith("ssh-ed25519-cert-v01@openssh.com ")

    error = refusal(cert)

    assert error.code == "certificate"
    assert "certificates are not accepted" in error.messages[0]


def test_it_rejects_an_rfc4716_export_and_says_how_to_convert_it(keys: dict[str, Path]) -> None:
    exported = ssh_keygen("-e", "-f", keys["ed25519"].with_suffix(".pub"))
    assert exported.startswith("---- BEGIN SSH2 PUBLIC KEY ----")

    error = refusal(exported)

    assert error.code == "rfc4716"
    assert "ssh-keygen -i -f" in error.messages[0]
    assert "OpenSSH one-line form" in error.messages[0]


@pytest.mark.parametrize("text", ["", "   ", "\n\r\n\t"])
def test_it_rejects_empty_input(text: str) -> None:
    error = refusal(text)

    assert error.code == "empty"
    assert "the field is empty" in error.messages[0]


@pytest.mark.parametrize("bad", ["\0", "\x1b[31m", "\x7f"])
def test_it_rejects_control_characters(keys: dict[str, Path], bad: str) -> None:
    key_type, data, _ = public(keys["ed25519"]).split()

    error = refusal(f"{key_type} {data} student{bad}@laptop")

    assert error.code == "control_characters"
    assert "not one line of text" in error.messages[0]


def test_it_rejects_a_nul_byte_between_the_fields(keys: dict[str, Path]) -> None:
    key_type, data, _ = public(keys["ed25519"]).split()

    error = refusal(f"{key_type}\0{data}")

    assert error.code == "control_characters"


def test_it_rejects_absurdly_long_input(keys: dict[str, Path]) -> None:
    error = refusal(public(keys["ed25519"]).strip() + " " + "x" * 100 * 1024)

    assert error.code == "too_long"
    assert "far too long" in error.messages[0]


def test_it_rejects_trailing_bytes_after_the_key(keys: dict[str, Path]) -> None:
    blob = blob_of(public(keys["ed25519"])) + b"\0\0\0\0"

    error = refusal(key_line("ssh-ed25519", blob))

    assert error.code == "damaged"


def test_it_rejects_an_ed25519_key_of_the_wrong_length() -> None:
    blob = wire_string(b"ssh-ed25519") + wire_string(secrets.token_bytes(31))

    error = refusal(key_line("ssh-ed25519", blob))

    assert error.code == "damaged"


def test_it_rejects_an_ecdsa_key_whose_curve_disagrees_with_its_type() -> None:
    point = secrets.token_bytes(96)
    blob = (
        wire_string(b"ecdsa-sha2-nistp384") + wire_string(b"nistp256") + wire_string(b"\4" + point)
    )

    error = refusal(key_line("ecdsa-sha2-nistp384", blob))

    assert error.code == "damaged"


def test_it_rejects_an_ecdsa_point_too_short_for_its_curve() -> None:
    blob = (
        wire_string(b"ecdsa-sha2-nistp521")
        + wire_string(b"nistp521")
        + wire_string(b"\4" + secrets.token_bytes(128))
    )

    error = refusal(key_line("ecdsa-sha2-nistp521", blob))

    assert error.code == "damaged"


def test_it_rejects_a_security_key_without_its_application() -> None:
    blob = wire_string(b"sk-ssh-ed25519@openssh.com") + wire_string(secrets.token_bytes(32))

    error = refusal(key_line("sk-ssh-ed25519@openssh.com", blob))

    assert error.code == "damaged"


def test_it_rejects_an_rsa_key_larger_than_openssh_allows() -> None:
    modulus = secrets.randbits(16392) | (1 << 16391) | 1
    blob = wire_string(b"ssh-rsa") + wire_mpint(65537) + wire_mpint(modulus)

    error = refusal(key_line("ssh-rsa", blob))

    assert error.code == "rsa_too_long"
    assert "at most 16384" in error.messages[0]
