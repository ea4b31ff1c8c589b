"""libvirt's errors mapped to the driver's three (labs.drivers.base), in one place."""

from __future__ import annotations

import libvirt

from labs.drivers.base import DomainMissing, HypervisorError, HypervisorUnavailable

# Error codes that mean "try again later" whatever part of libvirt raised them.
_TRANSIENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
# Generic codes that are transient when the transport raised them (connection refused,
# connection reset, "client socket is closed", ssh failures).
_TRANSPORT_DOMAINS = frozenset(
    {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_SSH, libvirt.VIR_FROM_LIBSSH}
)
_TRANSPORT_CODES = frozenset({libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR})


def is_transient(error: libvirt.libvirtError) -> bool:
    code, domain = error.get_error_code(), error.get_error_domain()
    return code in _TRANSIENT_CODES or (code in _TRANSPORT_CODES and domain in _TRANSPORT_DOMAINS)


def classify(error: libvirt.libvirtError, *, host: str, doing: str) -> HypervisorError:
    """The one place that turns a libvirtError into a Stratus error with a readable message."""
    detail = (error.get_error_message() or str(error)).strip()
    if is_transient(error):
        return HypervisorUnavailable(f"host {host} did not answer while {doing}: {detail}")
    if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainMissing(f"{doing} failed: the VM does not exist on host {host}")
    return HypervisorError(f"{doing} failed on host {host}: {detail}")


def error_code(error: libvirt.libvirtError) -> int:
    return error.get_error_code()


def classify_connect(error: libvirt.libvirtError, *, host: str, uri: str) -> HypervisorError:
    detail = (error.get_error_message() or str(error)).strip()
    if is_transient(error):
        return HypervisorUnavailable(f"host {host} did not answer: {detail}")
    return HypervisorError(f"cannot connect to host {host} ({uri}): {detail}")
