"""The libvirt driver package: the only place in Stratus that imports ``libvirt``."""

from labs.drivers.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
