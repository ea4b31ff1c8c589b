"""Registering what operators bring: base images and hypervisor hosts."""

import hashlib
import json
import subprocess
from pathlib import Path

from django.core.exceptions import ValidationError

from labs.models import Host, Image


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _virtual_size_gib(path: Path) -> int:
    info = subprocess.run(  # noqa: S603 - argument list, no shell
        ["/usr/bin/qemu-img", "info", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    size = json.loads(info.stdout)["virtual-size"]
    return max(1, -(-size // 1024**3))  # round up


def image_register(*, name: str, path: Path, os: str, login_user: str = "student") -> Image:
    """Create or update the Image row for a base qcow2 already on the hosts."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"No image file at {path}.")
    sha256 = _sha256(path)
    old = Image.objects.filter(name=name).first()
    if old is not None and (old.path, old.sha256) != (str(path), sha256):
        from labs.compute.images import image_in_use

        why = image_in_use(old)
        if why:  # overlays name the old file: never swap it under them
            raise ValidationError(
                f"The image {name} is in use ({why}): register the new file under a new name."
            )
    image, _ = Image.objects.update_or_create(
        name=name,
        defaults={
            "os": os,
            "login_user": login_user,
            "path": str(path),
            "size_gib": _virtual_size_gib(path),
            "sha256": sha256,
        },
    )
    return image


def host_register(*, name: str, uri: str, **fields) -> Host:
    """Create or update a hypervisor host (validated like the admin form)."""
    host = Host.objects.filter(name=name).first() or Host(name=name)
    host.uri = uri
    for field, value in fields.items():
        setattr(host, field, value)
    host.full_clean()
    host.save()
    return host
