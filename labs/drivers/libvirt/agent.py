"""SSH keys and accounts inside a running guest, through the QEMU guest agent.

Keys go through libvirt's own API (``authorizedSSHKeysGet/Set``, which drive qemu-ga's
``guest-ssh-*`` commands). Accounts have no libvirt API, so creating, disabling and
re-enabling them goes through qemu-ga's ``guest-exec``. That runs as root in the guest:
here it only ever runs fixed programs with an argument list (never a shell), and the only
value from outside is a user name that passed ``cloudinit.username_for`` (a-z, 0-9, '_',
'-'), checked again before any command is built.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from labs.drivers.base import HypervisorError, HypervisorUnavailable
from labs.drivers.cloudinit import DEFAULT_SHELL, SUDO_RULE, username_for

log = logging.getLogger(__name__)

PING_SECONDS = 5  # one guest-ping; the agent answers in milliseconds once it runs
POLL_SECONDS = 0.05
EXEC_SECONDS = 30  # one command in the guest (useradd, pkill)
NOT_FOUND = 2  # getent's exit status for "no such entry"


@dataclass(frozen=True)
class Result:
    exitcode: int
    out: str
    err: str


def _command(dom: libvirt.virDomain, execute: str, timeout: float, **arguments) -> object:
    payload = {"execute": execute}
    if arguments:
        payload["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), max(1, int(timeout)), 0)
    return json.loads(reply).get("return")


def wait_ready(dom: libvirt.virDomain, *, timeout: float, what: str) -> None:
    """Wait until the guest agent answers (a guest just started needs its boot first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _command(dom, "guest-ping", PING_SECONDS)
            return
        except libvirt.libvirtError as error:
            if time.monotonic() >= deadline:
                raise HypervisorUnavailable(
                    f"the guest agent of {what} did not answer within {timeout:.0f} s "
                    f"({(error.get_error_message() or str(error)).strip()})"
                ) from None
        time.sleep(1)


def run(
    dom: libvirt.virDomain, argv: list[str], *, stdin: str = "", timeout: float = EXEC_SECONDS
) -> Result:
    """Run ``argv`` (absolute path first) in the guest as root and wait for it."""
    arguments: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin:
        arguments["input-data"] = base64.b64encode(stdin.encode()).decode()
    pid = _command(dom, "guest-exec", timeout, **arguments)["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = _command(dom, "guest-exec-status", timeout, pid=pid)
        if status.get("exited"):
            return Result(
                exitcode=int(status.get("exitcode", -1)),
                out=_decoded(status.get("out-data")),
                err=_decoded(status.get("err-data")),
            )
        if time.monotonic() >= deadline:
            raise HypervisorError(f"{argv[0]} did not finish in the guest within {timeout} s")
        time.sleep(POLL_SECONDS)


def _decoded(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace").strip() if data else ""


def _checked(dom: libvirt.virDomain, argv: list[str], *, stdin: str = "", ok=(0,)) -> Result:
    result = run(dom, argv, stdin=stdin)
    if result.exitcode not in ok:
        raise HypervisorError(
            f"{' '.join(argv[:1] + argv[1:2])} failed in the guest "
            f"(exit {result.exitcode}): {result.err[:200]}"
        )
    return result


def _sudoers_file(user: str) -> str:
    return f"/etc/sudoers.d/90-stratus-{user}"


def account_exists(dom: libvirt.virDomain, user: str) -> bool:
    user = username_for(user)
    return _checked(dom, ["/usr/bin/getent", "passwd", user], ok=(0, NOT_FOUND)).exitcode == 0


def account_enable(dom: libvirt.virDomain, user: str) -> None:
    """The account exists, may log in and has passwordless sudo, as the seed makes them
    (a member added after the VM was created has no account yet)."""
    user = username_for(user)
    if not account_exists(dom, user):
        _checked(dom, ["/usr/sbin/useradd", "--create-home", "--shell", DEFAULT_SHELL, user])
        _checked(dom, ["/usr/bin/tee", _sudoers_file(user)], stdin=f"{user} {SUDO_RULE}\n")
        _checked(dom, ["/usr/bin/chmod", "0440", _sudoers_file(user)])
        log.info("created the account %s in the guest", user)
    # An account disabled when its member left comes back when they return.
    _checked(dom, ["/usr/bin/chage", "--expiredate", "-1", user])


def account_disable(dom: libvirt.virDomain, user: str) -> None:
    """The account can no longer log in (expired, no keys) and nothing of it runs."""
    user = username_for(user)
    if not account_exists(dom, user):
        return
    keys_set(dom, user, keys=[], remove=None)
    _checked(dom, ["/usr/bin/chage", "--expiredate", "0", user])
    _checked(dom, ["/usr/bin/rm", "-f", _sudoers_file(user)])
    run(dom, ["/usr/bin/loginctl", "terminate-user", user])  # fails when no session: fine
    run(dom, ["/usr/bin/pkill", "--signal", "KILL", "--uid", user])  # 1: nothing to kill
    log.info("disabled the account %s in the guest", user)


def keys_get(dom: libvirt.virDomain, user: str) -> list[str]:
    """The keys in ``user``'s authorized_keys; [] when the file is not there (an account
    with no keys yet). Any other failure (an agent that timed out under load) raises:
    read as "no keys", it would leave a removed key in place."""
    try:
        return dom.authorizedSSHKeysGet(user, 0)
    except libvirt.libvirtError as error:
        if "No such file or directory" in (error.get_error_message() or str(error)):
            return []
        raise


def keys_set(dom: libvirt.virDomain, user: str, *, keys: list[str], remove: list[str] | None):
    """Give ``user`` the ``keys``. With ``remove`` a list, take those keys out and keep
    the rest (keys a student added themselves); with None, ``keys`` is the whole set.
    The file is read back afterwards: HypervisorError unless it holds what was asked."""
    user = username_for(user)
    present = keys_get(dom, user)
    if remove is None:
        stale = [k for k in present if k not in keys]
    else:
        stale = [k for k in present if k in remove and k not in keys]
    if stale:
        dom.authorizedSSHKeysSet(user, stale, libvirt.VIR_DOMAIN_AUTHORIZED_SSH_KEYS_SET_REMOVE)
    missing = [k for k in keys if k not in present]
    if missing:
        dom.authorizedSSHKeysSet(user, missing, libvirt.VIR_DOMAIN_AUTHORIZED_SSH_KEYS_SET_APPEND)
    if stale or missing:
        held = keys_get(dom, user)
        if any(k in held for k in stale) or any(k not in held for k in keys):
            raise HypervisorError(
                f"the guest's agent did not update the SSH keys of {user} "
                f"({len(held)} held after the change)"
            )


def users(dom: libvirt.virDomain, *, timeout: float) -> list[str]:
    """The users logged in inside the guest (qemu-ga ``guest-get-users``, which reads
    utmp: a console login or an interactive SSH session counts, ``ssh host cmd`` does
    not), each name once. Raises libvirt's error when the agent does not answer."""
    reply = _command(dom, "guest-get-users", timeout) or []
    return sorted({str(entry.get("user", "")) for entry in reply if entry.get("user")})
