"""The whole console path in a real browser: uvicorn + Channels consumer, a Celery worker,
Redis, libvirt and a real guest from the built image, driven by headless Chromium."""

import secrets
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from labs.choices import OperationKind
from labs.compute.requests import vm_operation_request
from labs.models import ConsoleSession

from ..e2e.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from .conftest import approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def tty1_text(key: Path, port: int) -> str:
    """What the guest's first virtual console shows, read inside the guest."""
    return ssh(key, port, "sudo cat /dev/vcs1").stdout


def guest_screen(domain: str, path: Path, uri: str = "qemu:///system") -> tuple[int, int, bytes]:
    """The VM's framebuffer as QEMU holds it (libvirt's screenshot), as RGB bytes."""
    subprocess.run(
        ["virsh", "-q", "-c", uri, "screenshot", domain, "--file", str(path)],
        check=True,
        capture_output=True,
    )
    return png_rgb(path.read_bytes())


def png_rgb(data: bytes) -> tuple[int, int, bytes]:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG (what QEMU writes) to RGB bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    stride = width * channels
    raw, rows, prev = zlib.decompress(idat), [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, up_left = prev[x], prev[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[x] = (line[x] + pred) & 0xFF
        rows.append(
            bytes(line) if channels == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3)
        )
        prev = line
    return width, height, b"".join(rows)


CANVAS_RGB = """() => {
  const canvas = document.querySelector('#console-screen canvas');
  const ctx = canvas.getContext('2d');
  const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const rgb = new Array(canvas.width * canvas.height * 3);
  for (let i = 0, j = 0; i < data.length; i += 4) {
    rgb[j++] = data[i]; rgb[j++] = data[i + 1]; rgb[j++] = data[i + 2];
  }
  return {width: canvas.width, height: canvas.height, rgb};
}"""


def canvas_matches_guest(page, domain: str, tmp_path: Path, uri: str = "qemu:///system") -> bool:
    width, height, pixels = guest_screen(domain, tmp_path / "screen.ppm", uri)
    canvas = page.evaluate(CANVAS_RGB)
    if (canvas["width"], canvas["height"]) != (width, height):
        return False
    shown = bytes(canvas["rgb"])
    differing = sum(1 for a, b in zip(shown, pixels, strict=True) if a != b)
    return differing <= len(pixels) // 1000  # the cursor may blink between the two reads


@pytest.mark.sqlite_pass_only  # about consoles, not the database
def test_a_member_sees_the_login_prompt_and_types_into_the_console(
    course,
    alice,
    ines,
    qemu_host,
    debian_template,
    worker,
    asgi_server,
    group_keypair,
    tmp_path,
):
    key, public = group_keypair
    password = secrets.token_urlsafe(12)
    alice.set_password(password)
    alice.save()
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Console", public_key=public
    )
    wait_operation(provision)
    vm.refresh_from_db()
    # The console is the domain's own unix socket (no TCP port at all), and its name.
    assert vm.vnc_socket and vm.vnc_port is None and vm.vnc_name == f"QEMU ({vm.domain_name})"
    wait_for_ssh(key, vm.ssh_port)
    wait_for(
        lambda: "login:" in tty1_text(key, vm.ssh_port),
        timeout=60,
        what="the login prompt on tty1",
    )

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        page.goto(asgi_server.url + "/accounts/login/")
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.goto(f"{asgi_server.url}/vms/{vm.pk}/console/")
        page.locator("#console-status[data-state='connected']").wait_for()

        # The canvas shows the guest's own screen, which holds the login prompt.
        wait_for(
            lambda: canvas_matches_guest(page, vm.domain_name, tmp_path),
            timeout=30,
            what="the canvas to show the guest's screen",
        )

        # Keys typed in the page reach the guest's console, and the canvas follows.
        page.locator("#console-screen canvas").click()
        page.keyboard.type("stratus42")
        wait_for(
            lambda: "login: stratus42" in tty1_text(key, vm.ssh_port),
            timeout=20,
            what="the typed text on tty1",
        )
        wait_for(
            lambda: canvas_matches_guest(page, vm.domain_name, tmp_path),
            timeout=20,
            what="the canvas to show the typed text",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-login-prompt.png"))

        # The site restarts under the open console: it says so, and comes back by itself
        # with a fresh ticket, showing the guest again (no reload, no click).
        asgi_server.stop()
        page.locator("#console-status[data-state='connecting']").wait_for(timeout=15_000)
        asgi_server.start()
        page.locator("#console-status[data-state='connected']").wait_for(timeout=30_000)
        wait_for(
            lambda: canvas_matches_guest(page, vm.domain_name, tmp_path),
            timeout=20,
            what="the canvas to show the guest again after the restart",
        )
        browser.close()

    session = wait_for(
        lambda: ConsoleSession.objects.filter(vm=vm, user=alice, ended_at__isnull=False).first(),
        timeout=10,
        what="the console session to be recorded",
    )
    assert session.bytes_from_vm > 0 and session.bytes_to_vm > 0
    # Two sessions: before the restart and after it, each with its own ticket.
    assert ConsoleSession.objects.filter(vm=vm, user=alice).count() == 2
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=alice))
