"""The view-only filter of the browser-to-VNC stream (labs/consoles/rfb.py)."""

import random
import struct

import pytest

from labs.consoles.rfb import (
    MAX_CUT_TEXT,
    ClientStreamFilter,
    RfbProtocolError,
    ServerStreamWatcher,
    WrongDesktop,
)

HANDSHAKE_38 = b"RFB 003.008\n" + b"\x01"  # version, security type None
PIXEL_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])


def set_pixel_format() -> bytes:
    return b"\x00\x00\x00\x00" + PIXEL_FORMAT


def set_encodings(*encodings: int) -> bytes:
    return struct.pack(">BxH", 2, len(encodings)) + b"".join(
        struct.pack(">i", e) for e in encodings
    )


def update_request(incremental: int = 1, w: int = 640, h: int = 480) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, 0, 0, w, h)


def key_event(keysym: int = 0x61, down: int = 1) -> bytes:
    return struct.pack(">BBxxI", 4, down, keysym)


def pointer_event(mask: int = 1, x: int = 10, y: int = 20) -> bytes:
    return struct.pack(">BBHH", 5, mask, x, y)


def cut_text(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 6, len(text)) + text


def extended_clipboard(payload: bytes) -> bytes:
    """ClientCutText in the Extended Clipboard form: a negative length."""
    return struct.pack(">Bxxxi", 6, -len(payload)) + payload


def continuous_updates(enable: int = 1) -> bytes:
    return struct.pack(">BBHHHH", 150, enable, 0, 0, 640, 480)


def fence(payload: bytes = b"") -> bytes:
    return struct.pack(">BxxxIB", 248, 0x80000000, len(payload)) + payload


def xvp(message: int = 4) -> bytes:  # 4 = reboot
    return struct.pack(">BxBB", 250, 1, message)


def set_desktop_size(screens: int = 1) -> bytes:
    return struct.pack(">BxHHBx", 251, 1024, 768, screens) + b"\x07" * 16 * screens


def qemu_key(keysym: int = 0x61, keycode: int = 30) -> bytes:
    return struct.pack(">BBHII", 255, 0, 1, keysym, keycode)


def qemu_audio(operation: int) -> bytes:
    extra = struct.pack(">BBI", 3, 2, 44100) if operation == 2 else b""
    return struct.pack(">BBH", 255, 1, operation) + extra


def viewer() -> ClientStreamFilter:
    """A view-only filter past the RFB 3.8 handshake (its output checked elsewhere)."""
    f = ClientStreamFilter(drop_input=True)
    assert f.feed(HANDSHAKE_38 + b"\x01") == HANDSHAKE_38 + b"\x01"
    return f


def test_drive_mode_forwards_every_byte_without_parsing():
    f = ClientStreamFilter(drop_input=False)
    garbage = b"\xff\x07 not RFB at all" + key_event()
    assert f.feed(garbage) is garbage
    assert f.feed(b"") == b""


@pytest.mark.parametrize(
    "handshake",
    [
        b"RFB 003.008\n\x01",  # security None
        b"RFB 003.007\n\x01",
        b"RFB 003.008\n\x02" + bytes(range(16)),  # VNC authentication response
        b"RFB 003.003\n",  # 3.3: the server picks the security type
    ],
)
def test_the_handshake_passes_and_then_input_is_dropped(handshake):
    f = ClientStreamFilter(drop_input=True)
    stream = handshake + b"\x01" + key_event() + update_request()
    assert f.feed(stream) == handshake + b"\x01" + update_request()


def test_a_viewer_always_asks_for_a_shared_session():
    # An exclusive ClientInit (0) would make QEMU disconnect the students' own console.
    f = ClientStreamFilter(drop_input=True)
    assert f.feed(HANDSHAKE_38 + b"\x00") == HANDSHAKE_38 + b"\x01"


@pytest.mark.parametrize(
    "message",
    [
        set_pixel_format(),
        set_encodings(),
        set_encodings(7, 0, -239, -258, -314),
        update_request(0),
        continuous_updates(),
        fence(),
        fence(b"x" * 64),
        qemu_audio(0),
        qemu_audio(1),
        qemu_audio(2),
    ],
)
def test_view_only_forwards_what_only_changes_the_picture(message):
    assert viewer().feed(message) == message


@pytest.mark.parametrize(
    "message",
    [
        key_event(),
        key_event(down=0),
        pointer_event(),
        cut_text(b"rm -rf /\n"),
        cut_text(b""),
        cut_text(b"x" * MAX_CUT_TEXT),
        extended_clipboard(struct.pack(">II", 0x1F000001, 0)),  # noVNC's capabilities
        qemu_key(),
        xvp(),
        set_desktop_size(0),
        set_desktop_size(3),
    ],
)
def test_view_only_drops_input_whole(message):
    f = viewer()
    assert f.feed(message + update_request()) == update_request()
    assert f.dropped_messages == 1


@pytest.mark.parametrize(
    "stream",
    [
        b"RFB 004.000\n",
        b"HTTP/1.1 200\n",
        HANDSHAKE_38[:-1] + b"\x13",  # VeNCrypt: not parsed, so not allowed
        HANDSHAKE_38 + b"\x01" + b"\x07",  # unknown message type
        HANDSHAKE_38 + b"\x01" + b"\xff\x09",  # unknown QEMU message
        HANDSHAKE_38 + b"\x01" + b"\xff\x01\x00\x05",  # unknown QEMU audio operation
        HANDSHAKE_38 + b"\x01" + struct.pack(">BxxxI", 6, MAX_CUT_TEXT + 1),
        HANDSHAKE_38 + b"\x01" + struct.pack(">Bxxxi", 6, -(MAX_CUT_TEXT + 1)),
        HANDSHAKE_38 + b"\x01" + struct.pack(">BxxxI", 6, 1 << 31),
        HANDSHAKE_38 + b"\x01" + struct.pack(">BxxxIB", 248, 0, 65),
    ],
)
def test_view_only_refuses_what_it_does_not_understand(stream):
    f = ClientStreamFilter(drop_input=True)
    with pytest.raises(RfbProtocolError):
        # Byte by byte, so the error also comes when the header arrives piecemeal.
        for i in range(len(stream)):
            f.feed(stream[i : i + 1])


def _random_session(rng: random.Random) -> tuple[bytes, bytes, int]:
    """A client stream of many messages, what a viewer may forward, and the drop count."""
    passed = [
        lambda: set_pixel_format(),
        lambda: set_encodings(*(rng.randint(-400, 20) for _ in range(rng.randint(0, 12)))),
        lambda: update_request(rng.randint(0, 1), rng.randint(1, 2000), rng.randint(1, 2000)),
        lambda: continuous_updates(rng.randint(0, 1)),
        lambda: fence(rng.randbytes(rng.randint(0, 64))),
        lambda: qemu_audio(rng.choice([0, 1, 2])),
    ]
    dropped = [
        lambda: key_event(rng.randint(0, 0xFFFFFFFF), rng.randint(0, 1)),
        lambda: pointer_event(rng.randint(0, 255), rng.randint(0, 65535), rng.randint(0, 9)),
        # Clipboard text full of bytes that look like message headers.
        lambda: cut_text(rng.randbytes(rng.randint(0, 3000))),
        lambda: extended_clipboard(rng.randbytes(rng.randint(4, 300))),
        lambda: qemu_key(rng.randint(0, 0xFFFF), rng.randint(0, 255)),
        lambda: xvp(rng.randint(2, 4)),
        lambda: set_desktop_size(rng.randint(0, 4)),
    ]
    stream, expected, drops = [HANDSHAKE_38 + b"\x00"], [HANDSHAKE_38 + b"\x01"], 0
    for _ in range(400):
        if rng.random() < 0.5:
            message = rng.choice(passed)()
            expected.append(message)
        else:
            message = rng.choice(dropped)()
            drops += 1
        stream.append(message)
    return b"".join(stream), b"".join(expected), drops


def _random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.choice([1, 1, 2, 3, 5, 7, 12, 20, 64, 500, 4096])
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def test_any_chunking_of_a_long_session_gives_the_same_result():
    rng = random.Random(6143)  # the RFC's number: a fixed seed, so failures reproduce
    for _ in range(60):
        stream, expected, drops = _random_session(rng)
        for _ in range(5):
            f = ClientStreamFilter(drop_input=True)
            out = b"".join(f.feed(chunk) for chunk in _random_chunks(rng, stream))
            assert out == expected
            assert f.dropped_messages == drops


def test_several_messages_in_one_frame_and_one_message_in_many():
    f = viewer()
    burst = update_request() + key_event() + pointer_event() + set_encodings(7, 0)
    assert f.feed(burst) == update_request() + set_encodings(7, 0)
    message = set_encodings(*range(50))
    assert b"".join(f.feed(message[i : i + 3]) for i in range(0, len(message), 3)) == message


def test_what_a_viewer_forwards_holds_no_input_however_it_is_framed():
    # Filtering the forwarded bytes again drops nothing and changes nothing: the server,
    # which frames forwarded messages the same way, never sees an input message.
    rng = random.Random(5900)
    for _ in range(100):
        stream, _, _ = _random_session(rng)
        first = ClientStreamFilter(drop_input=True)
        forwarded = b"".join(first.feed(chunk) for chunk in _random_chunks(rng, stream))
        again = ClientStreamFilter(drop_input=True)
        assert again.feed(forwarded) == forwarded
        assert again.dropped_messages == 0


# --- whose screen is it: the server's ServerInit ---------------------------------------------

SERVER_INIT_HEAD = struct.pack(">HH", 640, 480) + bytes(16)


def server_init(name: bytes) -> bytes:
    return SERVER_INIT_HEAD + struct.pack(">I", len(name)) + name


def greeting(name: bytes, *, version: bytes = b"RFB 003.008\n") -> bytes:
    if version == b"RFB 003.003\n":
        return b"RFB 003.008\n" + struct.pack(">I", 1) + server_init(name)
    result = bytes(4) if version == b"RFB 003.008\n" else b""
    return b"RFB 003.008\n" + b"\x01\x01" + result + server_init(name)


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_the_vms_own_server_passes_whole_in_any_chunking(version):
    stream = greeting(b"QEMU (stratus-vm-7)", version=version) + b"screen bytes"
    watcher = ServerStreamWatcher(expected_name="QEMU (stratus-vm-7)")
    watcher.client_feed(version)
    out = b"".join(watcher.feed(stream[i : i + 1]) for i in range(len(stream)))
    assert out == stream and watcher.done


def test_another_vms_server_is_stopped_before_its_server_init():
    stream = greeting(b"QEMU (stratus-vm-8)") + b"screen bytes"
    watcher = ServerStreamWatcher(expected_name="QEMU (stratus-vm-7)")
    watcher.client_feed(b"RFB 003.008\n")
    forwarded = bytearray()
    with pytest.raises(WrongDesktop, match="stratus-vm-8"):
        for byte in stream:
            forwarded += watcher.feed(bytes([byte]))
    # Only the version, the security types and the result went out: nothing of the VM.
    assert bytes(forwarded) == b"RFB 003.008\n\x01\x01" + bytes(4)


def test_a_server_that_wants_a_password_is_refused():
    watcher = ServerStreamWatcher(expected_name="x")
    watcher.client_feed(b"RFB 003.008\n")
    with pytest.raises(RfbProtocolError, match="None"):
        watcher.feed(b"RFB 003.008\n\x01\x02")


def test_a_server_that_is_not_rfb_is_refused():
    watcher = ServerStreamWatcher(expected_name="x")
    with pytest.raises(RfbProtocolError, match="RFB"):
        watcher.feed(b"HTTP/1.1 200 OK\r\n")
