"""Which driver runs a host: a registry keyed by ``Host.driver``, imported lazily.

After healthchecks' TRANSPORTS: the web process, which never talks to a hypervisor,
does not import a driver's library just to render a page. A new hypervisor kind is one
entry here and one package behind the ``labs.drivers.base.Driver`` protocol.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from labs.choices import DriverKind
from labs.drivers.base import Driver, HypervisorError

if TYPE_CHECKING:
    from labs.models import Host

DRIVERS: dict[str, str] = {
    DriverKind.LIBVIRT: "labs.drivers.libvirt.LibvirtDriver",
}


def driver_class(kind: str) -> type[Driver]:
    try:
        module, _, name = DRIVERS[kind].rpartition(".")
    except KeyError:
        raise HypervisorError(f"no driver {kind!r}; known: {', '.join(DRIVERS)}") from None
    return getattr(import_module(module), name)


def driver_at(uri: str, *, kind: str = DriverKind.LIBVIRT, host_name: str = "") -> Driver:
    """The driver for one hypervisor URI. Cheap: drivers share their connection per URI."""
    return driver_class(kind)(uri, host_name=host_name)


def driver_for(host: Host) -> Driver:
    """The driver of one Host row."""
    return driver_at(host.uri, kind=host.driver, host_name=host.name)
