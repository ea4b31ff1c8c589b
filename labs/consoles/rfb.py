"""The client-to-server half of RFB (RFC 6143), just enough to enforce view-only consoles.

A view-only console must not type, click, paste, resize the screen or press a power
button, whatever the browser sends: the proxy, not the page, drops those messages. The
filter below follows the byte stream from the browser to the VNC server message by
message, on arbitrary chunk boundaries (one websocket frame may carry half a message or
several), forwards what only changes what the viewer sees (pixel format, encodings,
update requests), drops input, and raises ``RfbProtocolError`` on anything it does not
understand, so a client can never smuggle input past it by desynchronising the parser.

Why dropping is safe: what reaches the server is a sequence of whole messages as this
parser frames them, and every message type it forwards has a length that does not depend
on server state (the ones that do, like PointerEvent with the ExtendedMouseButtons marker,
are never forwarded). So the server frames the forwarded bytes exactly as the filter did,
whatever the client sent. The one assumption: an RFB 3.3 server (which picks the security
type without the client saying anything) uses security type None, as Stratus' QEMU
servers do; with VNC authentication the client would also need the VNC password, which the
portal never hands out.

Drive mode does not parse at all: the bytes go through untouched. The server-to-client
stream is never parsed either.
"""

import struct

# Client message types (RFC 6143 section 7.5, plus the extensions noVNC and QEMU use).
SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
XVP = 250  # power control: shutdown, reboot, reset
SET_DESKTOP_SIZE = 251
QEMU = 255  # QEMU client messages: 0 = extended key event, 1 = audio

# Longest clipboard text a client may announce (QEMU refuses more than 1 MiB, too).
MAX_CUT_TEXT = 1 << 20
MAX_FENCE_PAYLOAD = 64

_FIXED_SIZE = {
    SET_PIXEL_FORMAT: 20,
    FRAMEBUFFER_UPDATE_REQUEST: 10,
    KEY_EVENT: 8,
    POINTER_EVENT: 6,
    ENABLE_CONTINUOUS_UPDATES: 10,
    XVP: 4,
}
# What a viewer may not send: anything that reaches the guest or changes the VM.
_INPUT = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT, XVP, SET_DESKTOP_SIZE})
_QEMU_EXTENDED_KEY_EVENT = 0
_QEMU_AUDIO = 1

SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2

# Handshake phases, then messages.
_VERSION, _SECURITY, _VNC_AUTH_RESPONSE, _CLIENT_INIT, _MESSAGES = range(5)
_PHASE_SIZE = {_VERSION: 12, _SECURITY: 1, _VNC_AUTH_RESPONSE: 16, _CLIENT_INIT: 1}


class RfbProtocolError(ValueError):
    """The client sent something that is not RFB as we know it: close the connection."""


def _message_size(head: bytes | bytearray) -> tuple[int, bool]:
    """The size of the client message starting with ``head`` (at least its type byte).

    Returns ``(size, True)`` once the size is known, or ``(n, False)`` when the first
    ``n`` bytes are needed to know it.
    """
    kind = head[0]
    size = _FIXED_SIZE.get(kind)
    if size is not None:
        return size, True
    have = len(head)
    if kind == SET_ENCODINGS:  # type, padding, u16 count, count * s32
        if have < 4:
            return 4, False
        return 4 + 4 * struct.unpack_from(">H", head, 2)[0], True
    if kind == CLIENT_CUT_TEXT:  # type, 3 padding, s32 length, text
        if have < 8:
            return 8, False
        # A negative length is the Extended Clipboard form (noVNC sends its capabilities
        # that way, view-only too): -length bytes of flags and data follow.
        length = abs(struct.unpack_from(">i", head, 4)[0])
        if length > MAX_CUT_TEXT:
            raise RfbProtocolError("clipboard text too long")
        return 8 + length, True
    if kind == CLIENT_FENCE:  # type, 3 padding, u32 flags, u8 length, payload
        if have < 9:
            return 9, False
        if head[8] > MAX_FENCE_PAYLOAD:
            raise RfbProtocolError("fence payload too long")
        return 9 + head[8], True
    if kind == SET_DESKTOP_SIZE:  # type, pad, u16 w, u16 h, u8 screens, pad, 16 * screens
        if have < 8:
            return 8, False
        return 8 + 16 * head[6], True
    if kind == QEMU:
        if have < 2:
            return 2, False
        if head[1] == _QEMU_EXTENDED_KEY_EVENT:  # type, subtype, u16 down, u32 sym, u32 code
            return 12, True
        if head[1] == _QEMU_AUDIO:  # type, subtype, u16 operation [, u8, u8, u32]
            if have < 4:
                return 4, False
            operation = struct.unpack_from(">H", head, 2)[0]
            if operation in (0, 1):  # enable, disable
                return 4, True
            if operation == 2:  # set format
                return 10, True
        raise RfbProtocolError("unknown QEMU client message")
    raise RfbProtocolError(f"unknown client message type {kind}")


def _is_input(head: bytes | bytearray) -> bool:
    if head[0] == QEMU:
        return head[1] == _QEMU_EXTENDED_KEY_EVENT
    return head[0] in _INPUT


class ClientStreamFilter:
    """Follow the browser-to-VNC byte stream and return what may be forwarded.

    ``drop_input=False`` (drive mode) forwards everything without looking at it.
    ``drop_input=True`` (view-only) parses the handshake and every message, drops input
    messages whole, forces the ClientInit shared flag on (a viewer never disconnects the
    students' own console) and raises ``RfbProtocolError`` on anything unknown.
    """

    def __init__(self, *, drop_input: bool) -> None:
        self.drop_input = drop_input
        self.dropped_messages = 0
        self._phase = _VERSION
        self._head = bytearray()  # bytes of the current handshake step or message header
        self._body_left = 0  # bytes of the current message still to pass or drop
        self._body_dropped = False

    def feed(self, data: bytes) -> bytes:
        if not self.drop_input:
            return data
        out = bytearray()
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._body_left:  # the rest of a message whose fate is already decided
                take = min(self._body_left, end - pos)
                if not self._body_dropped:
                    out += view[pos : pos + take]
                self._body_left -= take
                pos += take
                continue
            if self._phase != _MESSAGES:
                take = min(_PHASE_SIZE[self._phase] - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) == _PHASE_SIZE[self._phase]:
                    out += self._handshake_step(bytes(self._head))
                    self._head.clear()
                continue
            # A message header: gather bytes until its size is known.
            if not self._head:
                self._head.append(view[pos])
                pos += 1
            size, known = _message_size(self._head)
            while not known and pos < end:
                take = min(size - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) >= size:
                    size, known = _message_size(self._head)
            if not known:
                break  # wait for the next chunk
            # The size is known and the header is never longer than the message: the
            # rest is its body, passed or dropped as it arrives.
            dropped = _is_input(self._head)
            if dropped:
                self.dropped_messages += 1
            else:
                out += self._head
            self._body_left = size - len(self._head)
            self._body_dropped = dropped
            self._head.clear()
        return bytes(out)

    def _handshake_step(self, step: bytes) -> bytes:
        if self._phase == _VERSION:
            if step not in (b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"):
                raise RfbProtocolError("unsupported protocol version")
            # 3.3: the server chooses the security type and the client says nothing.
            # (With VNC authentication the client would send 16 bytes here; the portal
            # never hands out VNC passwords and its servers use None.)
            self._phase = _CLIENT_INIT if step == b"RFB 003.003\n" else _SECURITY
            return step
        if self._phase == _SECURITY:
            if step[0] == SECURITY_NONE:
                self._phase = _CLIENT_INIT
            elif step[0] == SECURITY_VNC_AUTH:
                self._phase = _VNC_AUTH_RESPONSE
            else:
                raise RfbProtocolError("unsupported security type")
            return step
        if self._phase == _VNC_AUTH_RESPONSE:
            self._phase = _CLIENT_INIT
            return step
        # ClientInit: a viewer always asks for a shared session.
        self._phase = _MESSAGES
        return b"\x01"


# --- the server-to-client half: whose screen is this? --------------------------------------

MAX_DESKTOP_NAME = 4096
_V33, _V37, _V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"


class WrongDesktop(RfbProtocolError):
    """The VNC server is not the VM the console is for: close before its screen shows."""


class ServerStreamWatcher:
    """Follow the VNC-server-to-browser stream until its ServerInit, and let nothing past
    it unless the desktop name is the one expected.

    A console connects to the endpoint its VM last recorded. If that endpoint ever
    belonged to another VM (a freed port handed to the next VM that started), the
    ServerInit names that other VM: the watcher raises ``WrongDesktop`` before a single
    byte of its screen is forwarded. Before ServerInit the server sends only the protocol
    version, its security types and the security result, which say nothing about the VM.

    How the server's messages are framed depends on the version the *client* answered
    (3.3 has no type list, 3.7 no security result for None), so the transport also hands
    the watcher the browser's first bytes (``client_feed``). Stratus' QEMU servers use
    security type None; a server that offers anything else is refused here.
    """

    def __init__(self, *, expected_name: str) -> None:
        self.expected_name = expected_name
        self.done = False
        self._server_version = b""
        self._client_version = bytearray()
        self._pending = bytearray()  # server bytes not yet forwarded
        self._stage = "version"

    def client_feed(self, data: bytes) -> None:
        if len(self._client_version) < 12:
            self._client_version += data[: 12 - len(self._client_version)]

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` (from the server) that may go to the browser now."""
        if self.done:
            return data
        self._pending += data
        out = bytearray()
        while not self.done:
            step = self._step()
            if step is None:
                break
            out += self._pending[:step]
            del self._pending[:step]
        if self.done:
            out += self._pending
            self._pending.clear()
        return bytes(out)

    def _step(self) -> int | None:
        """The length of the next whole server message to forward, or None for more."""
        buf = self._pending
        if self._stage == "version":
            if len(buf) < 12:
                return None
            if not bytes(buf[:12]).startswith(b"RFB 003."):
                raise RfbProtocolError("the VNC server did not speak RFB")
            self._server_version = bytes(buf[:12])
            self._stage = "security"
            return 12
        if self._stage == "security":
            if len(self._client_version) < 12:
                return None  # framed by the client's version: wait for it
            version = bytes(self._client_version)
            if version == _V33:
                if len(buf) < 4:
                    return None
                if struct.unpack_from(">I", buf)[0] != SECURITY_NONE:
                    raise RfbProtocolError("the VNC server did not offer security type None")
                self._stage = "init"
                return 4
            if version not in (_V37, _V38):
                raise RfbProtocolError("unsupported protocol version")
            if not buf or len(buf) < 1 + buf[0]:
                return None
            if SECURITY_NONE not in buf[1 : 1 + buf[0]]:
                raise RfbProtocolError("the VNC server did not offer security type None")
            size = 1 + buf[0]
            self._stage = "result" if version == _V38 else "init"
            return size
        if self._stage == "result":
            if len(buf) < 4:
                return None
            if struct.unpack_from(">I", buf)[0] != 0:
                raise RfbProtocolError("the VNC server refused the connection")
            self._stage = "init"
            return 4
        # ServerInit: u16 width, u16 height, 16 bytes pixel format, u32 name length, name.
        if len(buf) < 24:
            return None
        length = struct.unpack_from(">I", buf, 20)[0]
        if length > MAX_DESKTOP_NAME:
            raise RfbProtocolError("desktop name too long")
        if len(buf) < 24 + length:
            return None
        name = bytes(buf[24 : 24 + length]).decode("utf-8", "replace")
        if name != self.expected_name:
            raise WrongDesktop(f"the VNC server is {name!r}, not {self.expected_name!r}")
        self.done = True
        return 24 + length
