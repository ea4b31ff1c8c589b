"""One libvirt connection per URI and process: cached, kept alive, re-opened after a drop.

libvirt's keepalive needs its event loop running, so the first connection of a process
starts libvirt's default event loop in a daemon thread (lazily and per process: a forked
Celery child starts its own). A forked child never uses nor closes its parent's
connections. A connection libvirt closes (keepalive timeout, EOF) is forgotten at once, and
the next call opens a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress

import libvirt

from labs.drivers.libvirt.errors import classify_connect

log = logging.getLogger(__name__)

# Keepalive: a probe every 5 s, the connection is dead after 3 unanswered ones.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3

_connections: dict[str, libvirt.virConnect] = {}
_uri_locks: dict[str, threading.Lock] = {}
_cache_lock = threading.Lock()
_owner_pid = os.getpid()
_event_loop_lock = threading.Lock()
_event_loop_pid: int | None = None
_event_impl_registered = False


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


def _ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (needed for keepalive), once.

    Lazy and per process: a forked Celery child starts its own thread on first use.
    """
    global _event_loop_pid, _event_impl_registered
    with _event_loop_lock:
        if _event_loop_pid == os.getpid():
            return
        if not _event_impl_registered:
            libvirt.virEventRegisterDefaultImpl()
            _event_impl_registered = True
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_pid = os.getpid()


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # keep the loop alive whatever a callback did
            log.exception("libvirt event loop iteration failed")
            time.sleep(1)


def _forget_after_fork() -> None:
    """A forked child must not use (or close) its parent's connections."""
    global _owner_pid
    if os.getpid() != _owner_pid:
        with _cache_lock:
            _inherited.extend(_connections.values())  # never closed: the parent owns them
            _connections.clear()
            _uri_locks.clear()
            _owner_pid = os.getpid()


_inherited: list[libvirt.virConnect] = []


def _on_close(conn: libvirt.virConnect, reason: int, uri: str) -> None:
    """libvirt closed the connection (keepalive timeout, EOF): the next call reconnects."""
    with _cache_lock:
        if _connections.get(uri) is conn:
            del _connections[uri]
    log.warning("libvirt connection to %s closed (reason %s); will reconnect", uri, reason)


def drop_connection(uri: str) -> None:
    with _cache_lock:
        conn = _connections.pop(uri, None)
    if conn is not None:
        with suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with suppress(libvirt.libvirtError):
            conn.close()


def connection(uri: str, *, host: str) -> libvirt.virConnect:
    _forget_after_fork()
    with _cache_lock:
        lock = _uri_locks.setdefault(uri, threading.Lock())
    with lock:
        conn = _connections.get(uri)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            drop_connection(uri)
        _ensure_event_loop()
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise classify_connect(error, host=host, uri=uri) from error
        _keep_alive(conn, uri)
        with _cache_lock:
            _connections[uri] = conn
        log.info("connected to %s (host %s)", uri, host)
        return conn


def _keep_alive(conn: libvirt.virConnect, uri: str) -> None:
    """Keepalive probes and a close callback, where the connection supports them.

    Local and remote daemons do; drivers that live in the client process (libvirt's own
    ``test:`` driver) have nothing to keep alive and say so with VIR_ERR_NO_SUPPORT.
    """
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        conn.registerCloseCallback(_on_close, uri)
    except libvirt.libvirtError as error:
        level = (
            logging.DEBUG
            if error.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
            else logging.WARNING
        )
        log.log(level, "no keepalive on %s: %s", uri, error.get_error_message())


def drop_if_dead(uri: str) -> None:
    """Forget the URI's connection when libvirt says it is no longer alive."""
    with _cache_lock:
        conn = _connections.get(uri)
    if conn is None:
        return
    try:
        alive = conn.isAlive()
    except libvirt.libvirtError:
        alive = False
    if not alive:
        drop_connection(uri)
