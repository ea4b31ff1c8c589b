"""A console of a VM on another host: an SSH channel from the web process to the VM's VNC
unix socket on that host (``direct-streamlocal``), one channel per console.

The web process holds one SSH key (``CONSOLE_SSH_KEY``), accepted on each hypervisor by an
account that may only forward (``restrict,port-forwarding`` in its authorized_keys) and that
can reach the domains' VNC sockets (group libvirt-qemu on Debian). The hypervisor's host key
is pinned on its Host row (``console_ssh_host_key``): an SSH server that does not hold it is
refused before anything is sent. The channel is encrypted and authenticated; VNC never
listens on a network. Which VM the proxy may reach stays the access policy's decision
(rules.target_for), and the RFB server's desktop name is still checked before a byte of
its screen is passed on (rfb.ServerStreamWatcher): the account reaches every domain's
socket, the portal chooses which.

One SSH connection per host is kept in this process and shared by its consoles (a console
opens in one round trip, not a new SSH handshake); a connection that dropped is made again
on the next console.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncssh
from django.conf import settings

log = logging.getLogger(__name__)

CONNECT_SECONDS = 10
KEEPALIVE_SECONDS = 30


@dataclass(frozen=True)
class SshRoute:
    """How the web process reaches one host's VNC sockets."""

    host: str
    port: int
    username: str
    host_key: str  # the server's public host key, one OpenSSH line

    @classmethod
    def parse(cls, address: str, host_key: str) -> SshRoute:
        """``user@host[:port]`` (the Host row's ``console_ssh``)."""
        user, _, rest = address.rpartition("@")
        name, _, port = rest.partition(":")
        if not user or not name:
            raise ValueError(f"console SSH address {address!r} is not user@host[:port]")
        return cls(host=name, port=int(port or 22), username=user, host_key=host_key.strip())


# Per event loop and route: a connection belongs to the loop that made it.
_connections: dict[tuple[int, SshRoute], asyncssh.SSHClientConnection] = {}
_locks: dict[tuple[int, SshRoute], asyncio.Lock] = {}


def _known_hosts(route: SshRoute) -> asyncssh.SSHKnownHosts:
    pattern = route.host if route.port == 22 else f"[{route.host}]:{route.port}"
    return asyncssh.import_known_hosts(f"{pattern} {route.host_key}\n")


async def _connection(route: SshRoute) -> asyncssh.SSHClientConnection:
    key = (id(asyncio.get_running_loop()), route)
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        conn = _connections.get(key)
        if conn is not None and not conn.is_closed():
            return conn
        conn = await asyncio.wait_for(
            asyncssh.connect(
                route.host,
                route.port,
                username=route.username,
                client_keys=[settings.CONSOLE_SSH_KEY],
                known_hosts=_known_hosts(route),
                agent_path=None,
                keepalive_interval=KEEPALIVE_SECONDS,
                config=[],  # no ~/.ssh/config of whoever runs the web process
            ),
            CONNECT_SECONDS,
        )
        log.info("console channel to %s@%s:%s open", route.username, route.host, route.port)
        _connections[key] = conn
        return conn


class _Transport:
    def __init__(self, writer: asyncssh.SSHWriter) -> None:
        self._writer = writer

    def abort(self) -> None:
        self._writer.channel.abort()


class TunnelWriter:
    """The proxy's view of the channel's sending side (an asyncio StreamWriter's)."""

    def __init__(self, writer: asyncssh.SSHWriter) -> None:
        self._writer = writer
        self.transport = _Transport(writer)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.channel.wait_closed()


async def open_unix(route: SshRoute, path: str):
    """A (reader, writer) pair to ``path`` on the route's host, like
    ``asyncio.open_unix_connection``; OSError when the host or the socket is unreachable."""
    try:
        conn = await _connection(route)
        reader, writer = await conn.open_unix_connection(path, encoding=None)
    except (asyncssh.Error, asyncssh.ChannelOpenError) as error:
        raise ConnectionRefusedError(f"console channel to {route.host}: {error}") from None
    return reader, TunnelWriter(writer)


def check(route: SshRoute) -> None:
    """Open the route's SSH connection once and close it (registering a host): OSError
    with the reason when the host, its key or ours is not right."""

    async def attempt():
        try:
            conn = await _connection(route)
        except (asyncssh.Error, OSError, TimeoutError) as error:
            raise ConnectionRefusedError(
                f"console channel to {route.username}@{route.host}:{route.port}: "
                f"{error or type(error).__name__}"
            ) from None
        conn.close()
        await conn.wait_closed()
        _connections.clear()

    asyncio.run(attempt())


async def close_all() -> None:
    """Close this process's channels (tests; a web process keeps them for its lifetime)."""
    loop = id(asyncio.get_running_loop())
    for key in [k for k in _connections if k[0] == loop]:
        conn = _connections.pop(key)
        conn.close()
        await conn.wait_closed()
