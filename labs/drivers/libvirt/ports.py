"""Published ports on a libvirt host: more slirp forwards beside SSH's, on the loopback.

The domain's definition is the host's truth for its forwards: its ``<qemu:commandline>``
``-netdev`` value (labs/drivers/libvirt/xml.py, ``netdev_value``) is rewritten from the
VM's rows, so every later start has them. A running QEMU takes them at once through its
monitor (HMP ``hostfwd_add`` / ``hostfwd_remove`` on netdev ``net0``; ``info usernet``
says what it forwards). QEMU is started from another XML than the definition on three
paths, each of which takes the definition's ``-netdev`` first: a snapshot's revert
(``snapshot_forwards_match``), a managed save's restore (``saved_forwards_match``) and a
live move's destination (migration.py, from the destination's spec).

Nothing here binds anything but 127.0.0.1.
"""

from __future__ import annotations

import logging
import time

import libvirt
import libvirt_qemu

from labs.drivers.base import HypervisorError, PortSpec
from labs.drivers.libvirt.xml import (
    FORWARD_ADDRESS,
    NETDEV_ID,
    SSH_GUEST_PORT,
    netdev_arg,
    netdev_forwards,
    netdev_value,
    parse,
    with_netdev,
)

log = logging.getLogger(__name__)

_HMP = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
_DEFINITION = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def usernet_forwards(report: str) -> dict[int, int]:
    """The TCP forwards in QEMU's ``info usernet`` output: {host port: guest port}.

    A line reads ``TCP[HOST_FORWARD]  14  127.0.0.1 24801  10.0.2.15  80  0  0``.
    """
    forwards = {}
    for line in report.splitlines():
        fields = line.split()
        forward = len(fields) >= 6 and fields[0] == "TCP[HOST_FORWARD]"
        if forward and fields[3].isdigit() and fields[5].isdigit():
            forwards[int(fields[3])] = int(fields[5])
    return forwards


def hmp(dom: libvirt.virDomain, command: str) -> str:
    """One HMP command on the domain's QEMU monitor; its text output."""
    return libvirt_qemu.qemuMonitorCommand(dom, command, _HMP) or ""


class PortsMixin:
    """The published-ports half of :class:`labs.drivers.libvirt.driver.LibvirtDriver`."""

    def ports_apply(
        self, name: str, *, ssh_port: int | None, ports: tuple[PortSpec, ...]
    ) -> float:
        """The domain forwards exactly SSH's port and ``ports``: in its definition, and in
        its running QEMU (forwards added and removed live; SSH's is never touched)."""
        started = time.monotonic()
        wanted = netdev_value(ssh_port, ports)
        dom = self._domain(name)
        with self._errors(f"reading the network of VM {name}"):
            definition = parse(dom.XMLDesc(_DEFINITION))
            active = bool(dom.isActive())
        arg = netdev_arg(definition)
        if arg is None:
            raise HypervisorError(
                f"VM {name} on host {self.host} has no user-mode network: ports are published "
                "only from user-mode networking"
            )
        if arg.get("value") != wanted:
            arg.set("value", wanted)
            self._redefine(definition, f"recording the published ports of {name}")
        if active:
            self._forwards_live(dom, name, ssh_port=ssh_port, ports=ports)
        elapsed = time.monotonic() - started
        log.info("ports of %s on %s: %s in %.3f s", name, self.host, wanted, elapsed)
        return elapsed

    def _forwards_live(
        self, dom, name: str, *, ssh_port: int | None, ports: tuple[PortSpec, ...]
    ) -> None:
        wanted = {p.host_port: p.guest_port for p in ports}
        with self._errors(f"publishing ports of {name}"):
            live = usernet_forwards(hmp(dom, "info usernet"))
            for host_port, guest_port in sorted(live.items()):
                if host_port == ssh_port and guest_port == SSH_GUEST_PORT:
                    continue
                if wanted.get(host_port) != guest_port:
                    hmp(dom, f"hostfwd_remove {NETDEV_ID} tcp:{FORWARD_ADDRESS}:{host_port}")
            for host_port, guest_port in sorted(wanted.items()):
                if live.get(host_port) == guest_port:
                    continue
                rule = f"tcp:{FORWARD_ADDRESS}:{host_port}-:{guest_port}"
                said = hmp(dom, f"hostfwd_add {NETDEV_ID} {rule}").strip()
                if said:  # QEMU answers nothing when the forward is set up
                    raise HypervisorError(
                        f"host {self.host} could not forward port {host_port} to guest port "
                        f"{guest_port} of {name}: {said}"
                    )
            now = usernet_forwards(hmp(dom, "info usernet"))
        missing = [h for h, g in wanted.items() if now.get(h) != g]
        if missing:
            raise HypervisorError(f"VM {name} does not forward port(s) {missing} after publishing")

    def _definition_netdev(self, dom) -> str | None:
        arg = netdev_arg(parse(dom.XMLDesc(_DEFINITION)))
        return arg.get("value") if arg is not None else None

    def snapshot_forwards_match(self, dom, snap) -> None:
        """Before a revert: the snapshot's domain forwards what the definition forwards
        now (a port unpublished since may be another VM's by now; QEMU would not start)."""
        netdev = self._definition_netdev(dom)
        if netdev is None:
            return
        xml = snap.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
        rewritten = with_netdev(xml, netdev)
        if rewritten == xml:
            return
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if snap.isCurrent(0):
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        dom.snapshotCreateXML(rewritten, flags)
        log.info("snapshot %s of %s forwards %s", snap.getName(), dom.name(), netdev)

    def saved_forwards_match(self, dom) -> None:
        """After a managed save: the save image's domain forwards what the definition
        forwards (the running QEMU's ports were added live, which its XML does not say)."""
        netdev = self._definition_netdev(dom)
        if netdev is None:
            return
        xml = dom.managedSaveGetXMLDesc(libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        rewritten = with_netdev(xml, netdev)
        if rewritten != xml:
            dom.managedSaveDefineXML(rewritten, 0)
            log.info("saved %s forwards %s", dom.name(), netdev)


def forwards_of(xml: str) -> dict[int, int]:
    """What a domain's XML forwards ({host port: guest port}); tests and reconcile."""
    root = parse(xml)
    domain = root if root.tag == "domain" else root.find("domain")
    arg = netdev_arg(domain) if domain is not None else None
    return netdev_forwards(arg.get("value", "")) if arg is not None else {}
