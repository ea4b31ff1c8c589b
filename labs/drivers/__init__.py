"""Hypervisor drivers: the protocol (``base``), the registry by ``Host.driver``, the
cloud-init seed every driver boots with, and the libvirt driver."""
