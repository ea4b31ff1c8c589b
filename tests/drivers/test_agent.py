"""Keys in a guest through its agent (labs/drivers/libvirt/agent.py): what the portal
does with the agent's answers. libvirt's test driver has no guest agent, so a small
stand-in domain keeps an authorized_keys list and can fail as qemu-ga does; the real agent
is exercised in tests/integration/test_one_guest.py."""

import libvirt
import pytest

from labs.drivers.base import HypervisorError
from labs.drivers.libvirt import agent

OLD, NEW, OWN = "ssh-ed25519 AAAAold", "ssh-ed25519 AAAAnew", "ssh-ed25519 AAAAown"


class Guest:
    """authorizedSSHKeysGet/Set over one user's keys (None: no authorized_keys file)."""

    def __init__(self, keys, *, read_error=None, ignores_remove=False):
        self.keys, self.read_error, self.ignores_remove = keys, read_error, ignores_remove

    def authorizedSSHKeysGet(self, user, flags):
        if self.read_error:
            error, self.read_error = self.read_error, None  # once
            raise libvirt.libvirtError(error)
        if self.keys is None:
            raise libvirt.libvirtError(
                f"internal error: unable to execute QEMU agent command "
                f"'guest-ssh-get-authorized-keys': failed to read "
                f"'/home/{user}/.ssh/authorized_keys': No such file or directory"
            )
        return list(self.keys)

    def authorizedSSHKeysSet(self, user, keys, flags):
        current = self.keys or []
        if flags & libvirt.VIR_DOMAIN_AUTHORIZED_SSH_KEYS_SET_REMOVE:
            if not self.ignores_remove:
                self.keys = [k for k in current if k not in keys]
        else:
            self.keys = current + [k for k in keys if k not in current]


def test_a_new_key_replaces_the_old_and_keeps_the_students_own():
    guest = Guest([OLD, OWN])
    agent.keys_set(guest, "alice", keys=[NEW], remove=[OLD])
    assert guest.keys == [OWN, NEW]


def test_an_account_without_authorized_keys_gets_the_key():
    guest = Guest(None)
    agent.keys_set(guest, "carol", keys=[NEW], remove=[OLD])
    assert guest.keys == [NEW]


def test_an_agent_that_fails_to_read_the_keys_fails_the_change_and_removes_nothing_silently():
    guest = Guest([OLD], read_error="Guest agent is not responding: timed out")
    with pytest.raises(libvirt.libvirtError, match="not responding"):
        agent.keys_set(guest, "alice", keys=[NEW], remove=[OLD])
    assert guest.keys == [OLD]  # untouched: the sync fails and is tried again, never "done"


def test_a_key_still_there_after_the_change_is_an_error():
    guest = Guest([OLD], ignores_remove=True)
    with pytest.raises(HypervisorError, match="did not update the SSH keys of alice"):
        agent.keys_set(guest, "alice", keys=[NEW], remove=[OLD])
