"""A console always shows its own VM, whatever happened to the VMs around it.

The hole this closes: consoles used to connect to the VNC port the database last recorded,
and libvirt hands a freed port to the next VM that starts. Now each running domain has a
VNC unix socket of its own, read from the live domain on every start, and the proxy checks
the desktop name in the server's ServerInit before a byte of the screen goes through.

The scenario, on two real guests through the real Channels consumer of a real ASGI server:
A's QEMU exits behind the portal's back (its row still says running), B is stopped and
started again meanwhile (it would have taken A's freed port), the portal reboots A. Then
each guest paints its screen (A's top half, B's bottom half, over SSH), and each console
names its own domain and shows the screen QEMU's own screenshot of that VM shows.
"""

import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from labs.choices import ObservedState, OperationKind
from labs.compute.requests import vm_operation_request
from labs.consoles import tickets

from .conftest import approve_new_group, keypair, ssh, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    )


class Stream:
    """Exactly-n reads over a websocket's binary messages."""

    def __init__(self, ws):
        self.ws, self.buffer = ws, bytearray()

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self.ws.recv(timeout=20)
        data, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        return data


def console(server, user, vm):
    session_key = _session(user)
    token = tickets.ticket_issue(user=user, vm=vm, session_key=session_key, view_only=False)
    return connect(
        f"ws://127.0.0.1:{server.port}/ws/vms/{vm.pk}/console/",
        subprotocols=[tickets.SUBPROTOCOL_PREFIX + token],
        additional_headers={"Cookie": f"sessionid={session_key}"},
        origin=server.url,
        proxy=None,
        open_timeout=15,
    )


def _session(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def rfb_screen(ws) -> tuple[str, int, int, bytes]:
    """Be an RFB 3.8 client: the desktop name, then one full raw frame as RGB bytes."""
    stream = Stream(ws)
    assert stream.read(12).startswith(b"RFB 003.")
    ws.send(b"RFB 003.008\n")
    types = stream.read(stream.read(1)[0])
    assert 1 in types  # security None
    ws.send(b"\x01")
    assert stream.read(4) == bytes(4)
    ws.send(b"\x01")  # shared
    head = stream.read(24)
    width, height = struct.unpack(">HH", head[:4])
    name = stream.read(struct.unpack(">I", head[20:24])[0]).decode()
    # 32 bpp, depth 24, little endian, true colour, red at bit 16, green 8, blue 0.
    ws.send(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    ws.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
    rgb = bytearray(width * height * 3)
    covered = 0
    while covered < width * height:
        kind = stream.read(1)[0]
        if kind == 2:  # bell
            continue
        if kind == 3:  # server cut text
            stream.read(3)
            stream.read(struct.unpack(">I", stream.read(4))[0])
            continue
        assert kind == 0, f"unexpected server message {kind}"
        stream.read(1)
        for _ in range(struct.unpack(">H", stream.read(2))[0]):
            x, y, w, h, encoding = struct.unpack(">HHHHi", stream.read(12))
            assert encoding == 0, f"unexpected encoding {encoding}"
            data = stream.read(w * h * 4)
            for row in range(h):
                for col in range(w):
                    b, g, r = data[(row * w + col) * 4 : (row * w + col) * 4 + 3]
                    at = ((y + row) * width + x + col) * 3
                    rgb[at : at + 3] = bytes((r, g, b))
            covered += w * h
    return name, width, height, bytes(rgb)


def screenshot(vm, path: Path) -> tuple[int, int, bytes]:
    """QEMU's own view of the screen: ``virsh screenshot`` (a PNG here) as RGB bytes."""
    result = virsh("screenshot", vm.domain_name, "--file", str(path))
    assert result.returncode == 0, result.stderr
    return png_rgb(path.read_bytes())


def png_rgb(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of an 8-bit RGB PNG (what QEMU's screendump writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, bytearray(), 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2), "expected 8-bit RGB"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, previous = zlib.decompress(bytes(idat)), width * 3, [], bytes(width * 3)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - 3] if i >= 3 else 0
            up, corner = previous[i], previous[i - 3] if i >= 3 else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                near = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + near) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, b"".join(rows)


def paint(key: Path, port: int, rows: range) -> None:
    """Clear the VM's text console and fill ``rows`` of it with solid blocks (reverse-video
    spaces), the cursor hidden and kernel messages off the console: a screen that says which
    VM it is, and that does not change while the two views of it are compared."""
    screen = "\033[?25l\033[2J" + "".join(f"\033[{row};1H\033[7m{' ' * 80}\033[0m" for row in rows)
    command = "sudo -n dmesg -n 1 && sudo -n tee /dev/tty1 > /dev/null"
    result = ssh(key, port, command, input=screen, timeout=60)
    assert result.returncode == 0, result.stderr


def differing(a: bytes, b: bytes) -> int:
    return sum(1 for i in range(0, len(a), 3) if abs(a[i] - b[i]) + abs(a[i + 1] - b[i + 1]) > 48)


@pytest.mark.sqlite_pass_only  # about consoles, not the database
def test_each_console_shows_its_own_vm_after_poweroff_restart_and_reboot(
    course,
    alice,
    carol,
    ines,
    qemu_host,
    debian_template,
    worker,
    group_keypair,
    asgi_server,
    tmp_path,
):
    key, public = group_keypair
    key_b, public_b = keypair(tmp_path / "b_key")
    vm_a, provision_a = approve_new_group(
        course, by=alice, reviewer=ines, name="A", public_key=public
    )
    vm_b, provision_b = approve_new_group(
        course,
        by=carol,
        reviewer=ines,
        name="A much longer group name",
        public_key=public_b,
    )
    wait_operation(provision_a, timeout=180)
    wait_operation(provision_b, timeout=180)

    # A's QEMU exits behind the portal's back: its row still says running.
    assert virsh("destroy", vm_a.domain_name).returncode == 0
    vm_a.refresh_from_db()
    assert vm_a.observed_state == ObservedState.RUNNING
    # B stops and starts again meanwhile: under TCP ports it would take A's freed one.
    wait_operation(vm_operation_request(vm=vm_b, kind=OperationKind.FORCE_OFF, by=carol))
    wait_operation(vm_operation_request(vm=vm_b, kind=OperationKind.START, by=carol))
    # A's console now reaches nothing: its socket went with its QEMU.
    with pytest.raises((InvalidStatus, ConnectionError, TimeoutError)):
        console(asgi_server, alice, vm_a).close()

    # The portal reboots A (a reboot of a stopped domain starts it): its new socket is read.
    wait_operation(vm_operation_request(vm=vm_a, kind=OperationKind.REBOOT, by=alice))
    vm_a.refresh_from_db()
    vm_b.refresh_from_db()
    assert vm_a.vnc_socket and vm_b.vnc_socket and vm_a.vnc_socket != vm_b.vnc_socket
    for vm in (vm_a, vm_b):  # libvirt's directory of the domain's *current* run
        domain_id = virsh("domid", vm.domain_name).stdout.strip()
        assert f"/domain-{domain_id}-" in vm.vnc_socket, (domain_id, vm.vnc_socket)
    assert vm_a.vnc_port is None and vm_b.vnc_port is None  # no TCP port at all

    # Each screen painted so that it says which VM it is: A's top half, B's bottom half.
    for vm, vm_key, rows in ((vm_a, key, range(1, 13)), (vm_b, key_b, range(13, 25))):
        wait_for_ssh(vm_key, vm.ssh_port)
        paint(vm_key, vm.ssh_port, rows)
    for vm, user in ((vm_a, alice), (vm_b, carol)):
        with console(asgi_server, user, vm) as ws:
            name, width, height, screen = rfb_screen(ws)
        assert name == f"QEMU ({vm.domain_name})"
        own = screenshot(vm, tmp_path / f"{vm.pk}.ppm")
        other_vm = vm_b if vm is vm_a else vm_a
        other = screenshot(other_vm, tmp_path / f"{other_vm.pk}-other.ppm")
        assert own[:2] == (width, height)
        own_diff, other_diff = differing(screen, own[2]), differing(screen, other[2])
        assert own_diff < 0.005 * width * height, (own_diff, other_diff)
        assert other_diff > 0.4 * width * height, (own_diff, other_diff)
    for vm, user in ((vm_a, alice), (vm_b, carol)):
        wait_operation(vm_operation_request(vm=vm, kind=OperationKind.DELETE, by=user))
