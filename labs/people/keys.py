"""Check the SSH public key a student pastes, and say plainly what is wrong with it.

The key blob is read in the SSH wire format (RFC 4251 section 5: every field is a big-endian
uint32 length followed by that many bytes), the way sshd would read it, so that a key we
accept is a key the VM will accept.
"""

import base64
import binascii
import hashlib
import unicodedata
from dataclasses import dataclass

from django.core.exceptions import ValidationError

MAX_INPUT_CHARS = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384  # OpenSSH's own limit: sshd refuses larger keys.

SK_ED25519 = "sk-ssh-ed25519@openssh.com"
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
CERT_SUFFIX = "-cert-v01@openssh.com"

# Key type -> (curve name inside the blob, bits).
ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": ("nistp256", 256),
    "ecdsa-sha2-nistp384": ("nistp384", 384),
    "ecdsa-sha2-nistp521": ("nistp521", 521),
    SK_ECDSA: ("nistp256", 256),
}
ACCEPTED_TYPES = frozenset({"ssh-ed25519", SK_ED25519, "ssh-rsa", *ECDSA_CURVES})

HOW_TO_GENERATE = "Generate a new key with: ssh-keygen -t ed25519"


@dataclass(frozen=True)
class SshKeyInfo:
    type: str
    bits: int
    fingerprint: str  # "SHA256:…", as `ssh-keygen -l` prints it
    comment: str
    line: str  # "type base64 comment", normalised


def sshkey_parse(*, text: str) -> SshKeyInfo:
    """Parse one OpenSSH public key line; raise ValidationError saying what to paste instead.

    Long because every way a student pastes the wrong thing (a private key, a PuTTY key,
    two keys, a certificate) gets its own sentence, in the order they are checked.
    """
    if len(text) > MAX_INPUT_CHARS:
        raise ValidationError(
            "This is far too long to be an SSH public key. Paste only the one line from "
            "your .pub file.",
            code="too_long",
        )
    text = text.strip()
    if not text:
        raise ValidationError("Paste your SSH public key: the field is empty.", code="empty")
    _refuse_other_formats(text)
    line = _single_line(text)

    fields = line.split()
    key_type = fields[0]
    if not _is_key_type(key_type):
        if any(_is_key_type(field) for field in fields[1:]):
            raise ValidationError(
                'Remove the options in front of the key type (such as command="…" or '
                "no-pty): paste only the key, starting with its type, e.g. ssh-ed25519.",
                code="key_options",
            )
        raise ValidationError(
            "“%(type)s” is not a key type Stratus accepts. Paste an OpenSSH public key "
            "starting with ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa, "
            "sk-ssh-ed25519@openssh.com or sk-ecdsa-sha2-nistp256@openssh.com.",
            code="unknown_type",
            params={"type": _shorten(key_type)},
        )
    if key_type.endswith(CERT_SUFFIX):
        raise ValidationError(
            "SSH certificates are not accepted. Paste the plain public key instead (the .pub "
            "file without -cert in its name).",
            code="certificate",
        )
    if key_type == "ssh-dss":
        raise ValidationError(
            "DSA keys (ssh-dss) are no longer secure and OpenSSH has dropped them. "
            + HOW_TO_GENERATE,
            code="dsa",
        )
    if len(fields) < 2:
        raise _damaged()

    try:
        blob = base64.b64decode(fields[1], validate=True)
    except binascii.Error:
        raise _damaged() from None
    bits = _read_blob(key_type, _WireReader(blob))

    comment = " ".join(fields[2:])
    encoded = base64.b64encode(blob).decode("ascii")
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return SshKeyInfo(
        type=key_type,
        bits=bits,
        fingerprint=f"SHA256:{digest}",
        comment=comment,
        line=" ".join(filter(None, [key_type, encoded, comment])),
    )


def _refuse_other_formats(text: str) -> None:
    """Private keys and multi-line public key formats, pasted instead of the .pub line."""
    if text.startswith("PuTTY-User-Key-File-"):
        raise ValidationError(
            "This is a PuTTY private key (.ppk). Never share it: open it in PuTTYgen and "
            "paste the text from “Public key for pasting into OpenSSH authorized_keys file” "
            "instead.",
            code="private_key",
        )
    if "PRIVATE KEY-----" in text or "PRIVATE KEY ----" in text:
        raise ValidationError(
            "This is a private key. Never share it: paste the contents of your .pub file "
            "instead (for example ~/.ssh/id_ed25519.pub).",
            code="private_key",
        )
    if "---- BEGIN SSH2 PUBLIC KEY ----" in text:
        raise ValidationError(
            "This is an SSH2 (RFC 4716) public key, as PuTTYgen or ssh-keygen -e writes it. "
            "Paste the OpenSSH one-line form instead: convert it with "
            "ssh-keygen -i -f yourkey.pub, or in PuTTYgen copy “Public key for pasting "
            "into OpenSSH authorized_keys file”.",
            code="rfc4716",
        )


def _single_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        keys = sum(any(_is_key_type(field) for field in line.split()) for line in lines)
        if keys > 1:
            raise ValidationError(
                "Paste only one key: this contains %(count)s keys, one per line.",
                code="multiple_keys",
                params={"count": keys},
            )
        raise ValidationError(
            "The key must be on a single line, but this is split over several lines. Copy it "
            "again from your .pub file, in one piece.",
            code="not_one_line",
        )
    if any(ch != "\t" and unicodedata.category(ch) == "Cc" for ch in text):
        raise ValidationError(
            "This contains invisible control characters, so it is not one line of text. "
            "Copy the key again from your .pub file.",
            code="control_characters",
        )
    return text


def _is_key_type(name: str) -> bool:
    return name in ACCEPTED_TYPES or name == "ssh-dss" or name.endswith(CERT_SUFFIX)


def _shorten(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _damaged() -> ValidationError:
    return ValidationError(
        "The key is incomplete or damaged. Copy the whole line from your .pub file again, "
        "without changing it.",
        code="damaged",
    )


class _WireReader:
    """Reads the fields of a key blob, front to back; any overrun means a damaged key."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def string(self) -> bytes:
        start = self._pos + 4
        if start > len(self._data):
            raise _damaged()
        end = start + int.from_bytes(self._data[self._pos : start], "big")
        if end > len(self._data):
            raise _damaged()
        self._pos = end
        return self._data[start:end]

    def positive_mpint(self) -> int:
        value = int.from_bytes(self.string(), "big", signed=True)
        if value <= 0:
            raise _damaged()
        return value

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _read_blob(key_type: str, blob: _WireReader) -> int:
    """Check the blob holds a well-formed key of key_type; return its size in bits."""
    inner_type = blob.string().decode("ascii", errors="replace")
    if inner_type != key_type:
        raise ValidationError(
            "The key type at the start of the line (%(outer)s) does not match the key itself "
            "(%(inner)s). Paste the line exactly as it is in your .pub file.",
            code="type_mismatch",
            params={"outer": key_type, "inner": _shorten(inner_type)},
        )

    if key_type in ("ssh-ed25519", SK_ED25519):
        if len(blob.string()) != 32:
            raise _damaged()
        bits = 256
    elif key_type in ECDSA_CURVES:
        curve, bits = ECDSA_CURVES[key_type]
        if blob.string() != curve.encode():
            raise _damaged()
        point = blob.string()  # uncompressed: 0x04, then x and y of (bits + 7) // 8 bytes each
        if len(point) != 1 + 2 * ((bits + 7) // 8) or point[0] != 4:
            raise _damaged()
    else:  # ssh-rsa: exponent e, then modulus n
        blob.positive_mpint()
        bits = blob.positive_mpint().bit_length()
        if bits < MIN_RSA_BITS:
            raise ValidationError(
                "This RSA key is only %(bits)s bits; at least %(min)s are required. "
                + HOW_TO_GENERATE,
                code="rsa_too_short",
                params={"bits": bits, "min": MIN_RSA_BITS},
            )
        if bits > MAX_RSA_BITS:
            raise ValidationError(
                "This RSA key is %(bits)s bits; OpenSSH accepts at most %(max)s. "
                + HOW_TO_GENERATE,
                code="rsa_too_long",
                params={"bits": bits, "max": MAX_RSA_BITS},
            )

    if key_type.startswith("sk-"):
        blob.string()  # the security key's application, usually "ssh:"
    if not blob.at_end():
        raise _damaged()
    return bits
