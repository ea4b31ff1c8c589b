"""Just enough of an RFB (RFC 6143) viewer to time a real VNC server: the handshake up to
ServerInit, raw framebuffer updates, and the console figures bench/migrate.py prints.

Works on any (reader, writer) pair of asyncio's kind: ``asyncio.open_unix_connection`` to a
domain's vnc.sock, or labs.consoles.tunnel's SSH channel to one on another host.
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import time
from dataclasses import dataclass

from bench.console import percentile

SET_ENCODINGS, FRAMEBUFFER_UPDATE_REQUEST = 2, 3
RAW = 0
MIB = 1 << 20


class RfbError(Exception):
    pass


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    bits_per_pixel: int
    name: str


async def handshake(reader, writer) -> ServerInit:
    """RFB 3.8, security None, a shared session, raw encoding only: the ServerInit."""
    version = await reader.readexactly(12)
    if not version.startswith(b"RFB 003."):
        raise RfbError(f"not an RFB server: {version!r}")
    writer.write(b"RFB 003.008\n")
    await writer.drain()
    count = (await reader.readexactly(1))[0]
    if count == 0:
        length = struct.unpack(">I", await reader.readexactly(4))[0]
        reason = await reader.readexactly(length)
        raise RfbError(f"the server refused: {reason.decode(errors='replace')}")
    if 1 not in await reader.readexactly(count):
        raise RfbError("the server does not offer security type None")
    writer.write(b"\x01")
    await writer.drain()
    if struct.unpack(">I", await reader.readexactly(4))[0] != 0:
        raise RfbError("security handshake failed")
    writer.write(b"\x01")  # ClientInit: shared
    await writer.drain()
    head = await reader.readexactly(24)
    width, height = struct.unpack_from(">HH", head)
    length = struct.unpack_from(">I", head, 20)[0]
    name = (await reader.readexactly(length)).decode(errors="replace")
    writer.write(struct.pack(">BxHi", SET_ENCODINGS, 1, RAW))
    await writer.drain()
    return ServerInit(width=width, height=height, bits_per_pixel=head[4], name=name)


async def request(writer, *, incremental: bool, x: int, y: int, w: int, h: int) -> None:
    writer.write(struct.pack(">BBHHHH", FRAMEBUFFER_UPDATE_REQUEST, incremental, x, y, w, h))
    await writer.drain()


async def read_update(reader, bits_per_pixel: int) -> int:
    """Read up to and including the next FramebufferUpdate (skipping bells, colour maps
    and cut text); its size in bytes."""
    while True:
        kind = (await reader.readexactly(1))[0]
        if kind == 0:
            break
        if kind == 1:  # SetColourMapEntries
            count = struct.unpack(">xHH", await reader.readexactly(5))[1]
            await reader.readexactly(6 * count)
        elif kind == 3:  # ServerCutText
            length = struct.unpack(">xxxI", await reader.readexactly(7))[0]
            await reader.readexactly(length)
        elif kind != 2:  # 2: Bell
            raise RfbError(f"unexpected server message type {kind}")
    rects = struct.unpack(">xH", await reader.readexactly(3))[0]
    size = 4
    for _ in range(rects):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
        if encoding != RAW:
            raise RfbError(f"unexpected encoding {encoding}")
        left = w * h * bits_per_pixel // 8
        size += 12 + left
        while left:
            take = min(left, MIB)
            await reader.readexactly(take)
            left -= take
    return size


async def update_round_trips(reader, writer, init: ServerInit, count: int) -> list[float]:
    """Seconds from a non-incremental 1x1 FramebufferUpdateRequest to its update."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await request(writer, incremental=False, x=0, y=0, w=1, h=1)
        await read_update(reader, init.bits_per_pixel)
        times.append(time.perf_counter() - started)
    return times


async def full_screens(reader, writer, init: ServerInit, seconds: float) -> tuple[float, float]:
    """Full-screen non-incremental raw updates one after another (a viewer asks for the
    next when one arrived) for about ``seconds``: (MiB/s, updates/s)."""
    received = frames = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        await request(writer, incremental=False, x=0, y=0, w=init.width, h=init.height)
        received += await read_update(reader, init.bits_per_pixel)
        frames += 1
    elapsed = time.perf_counter() - started
    return received / MIB / elapsed, frames / elapsed


@dataclass
class ConsoleFigures:
    open_ms: float  # connect + handshake to ServerInit, median
    rtt_p50_ms: float
    rtt_p99_ms: float
    mib_s: float
    updates_s: float
    screen: str


async def measure(opener, *, opens: int, round_trips: int, seconds: float) -> ConsoleFigures:
    """``opener()`` -> (reader, writer), a new connection to the console each call."""
    open_times = []
    for _ in range(opens):
        started = time.perf_counter()
        reader, writer = await opener()
        try:
            init = await handshake(reader, writer)
            open_times.append(time.perf_counter() - started)
        finally:
            writer.close()
    reader, writer = await opener()
    try:
        init = await handshake(reader, writer)
        await update_round_trips(reader, writer, init, 5)  # warm up
        rtts = await update_round_trips(reader, writer, init, round_trips)
        mib_s, updates_s = await full_screens(reader, writer, init, seconds)
    finally:
        writer.close()
    return ConsoleFigures(
        open_ms=statistics.median(open_times) * 1000,
        rtt_p50_ms=statistics.median(rtts) * 1000,
        rtt_p99_ms=percentile(rtts, 99) * 1000,
        mib_s=mib_s,
        updates_s=updates_s,
        screen=f"{init.width}x{init.height}x{init.bits_per_pixel}",
    )


async def wait_desktop(opener, desktop: str, *, timeout: float) -> float:
    """Open the console again and again until a ServerInit names ``desktop``: the
    time.monotonic() it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await opener()
            try:
                init = await asyncio.wait_for(handshake(reader, writer), 5)
            finally:
                writer.close()
            if init.name == desktop:
                return time.monotonic()
            problem = f"desktop {init.name!r}"
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, RfbError) as error:
            problem = f"{type(error).__name__}: {error}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no console named {desktop!r} after {timeout:.0f} s ({problem})")
        await asyncio.sleep(0.02)
