"""The console channel to another host's VNC socket (labs/consoles/tunnel.py), against a
real SSH server (asyncssh's, in this process) that forwards to a real unix socket. The
same channel through OpenSSH's sshd on a second libvirtd is
tests/integration/test_two_hosts.py."""

import asyncio

import asyncssh
import pytest

from labs.consoles import tunnel
from labs.consoles.tunnel import SshRoute


def test_an_address_is_user_at_host_and_an_optional_port():
    route = SshRoute.parse("stratus@hv2.example.edu:2222", " ssh-ed25519 AAAA \n")
    assert (route.username, route.host, route.port, route.host_key) == (
        "stratus",
        "hv2.example.edu",
        2222,
        "ssh-ed25519 AAAA",
    )
    assert SshRoute.parse("stratus@hv2", "k").port == 22
    with pytest.raises(ValueError, match="not user@host"):
        SshRoute.parse("hv2.example.edu", "k")


@pytest.fixture
def keys(tmp_path):
    host = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(tmp_path / "client"))
    return host, client, tmp_path / "client"


class _Server(asyncssh.SSHServer):
    def __init__(self, client_key):
        self._client_key = client_key

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return username == "stratus" and key == self._client_key.convert_to_public()

    def unix_connection_requested(self, dest_path):
        return True  # asyncssh then connects to dest_path itself


async def _serve(tmp_path, keys):
    host_key, client_key, _ = keys

    async def vnc(reader, writer):  # a VNC server's first words, then an echo
        writer.write(b"RFB 003.008\n")
        writer.write(await reader.read(5))
        await writer.drain()
        writer.close()

    socket_path = str(tmp_path / "vnc.sock")
    vnc_server = await asyncio.start_unix_server(vnc, socket_path)
    ssh_server = await asyncssh.create_server(
        lambda: _Server(client_key), "127.0.0.1", 0, server_host_keys=[host_key]
    )
    port = ssh_server.sockets[0].getsockname()[1]
    return vnc_server, ssh_server, port, socket_path


def test_a_channel_reaches_the_socket_and_carries_bytes_both_ways(tmp_path, keys, settings):
    settings.CONSOLE_SSH_KEY = str(keys[2])
    host_public = keys[0].export_public_key().decode().strip()

    async def scenario():
        vnc_server, ssh_server, port, socket_path = await _serve(tmp_path, keys)
        try:
            route = SshRoute(host="127.0.0.1", port=port, username="stratus", host_key=host_public)
            reader, writer = await tunnel.open_unix(route, socket_path)
            assert await reader.readexactly(12) == b"RFB 003.008\n"
            writer.write(b"hello")
            await writer.drain()
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await writer.wait_closed()
            # A second console reuses the connection: no new SSH handshake.
            before = len(tunnel._connections)
            reader, writer = await tunnel.open_unix(route, socket_path)
            assert len(tunnel._connections) == before
            writer.transport.abort()
        finally:
            await tunnel.close_all()
            ssh_server.close()
            vnc_server.close()

    asyncio.run(scenario())


def test_a_server_without_the_pinned_host_key_is_refused(tmp_path, keys, settings):
    settings.CONSOLE_SSH_KEY = str(keys[2])
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()

    async def scenario():
        vnc_server, ssh_server, port, socket_path = await _serve(tmp_path, keys)
        try:
            route = SshRoute(host="127.0.0.1", port=port, username="stratus", host_key=other)
            with pytest.raises(OSError, match="console channel to 127.0.0.1"):
                await tunnel.open_unix(route, socket_path)
        finally:
            await tunnel.close_all()
            ssh_server.close()
            vnc_server.close()

    asyncio.run(scenario())


def test_a_key_the_host_does_not_accept_is_refused(tmp_path, keys, settings):
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    stranger.write_private_key(str(tmp_path / "stranger"))
    settings.CONSOLE_SSH_KEY = str(tmp_path / "stranger")
    host_public = keys[0].export_public_key().decode().strip()

    async def scenario():
        vnc_server, ssh_server, port, socket_path = await _serve(tmp_path, keys)
        try:
            route = SshRoute(host="127.0.0.1", port=port, username="stratus", host_key=host_public)
            with pytest.raises(OSError, match="console channel"):
                await tunnel.open_unix(route, socket_path)
        finally:
            await tunnel.close_all()
            ssh_server.close()
            vnc_server.close()

    asyncio.run(scenario())
