"""A group's private network on a libvirt host (docs/networking.md).

Per group and host: an isolated libvirt network ``stx-g<id>`` (bridge ``stxg<id>``, no
<forward>, MTU 1450) whose dnsmasq gives each VM of the group its static address and
answers its name, and, when the group spans hosts, a VXLAN device on that bridge
(labs/drivers/libvirt/vxlan.py: netlink, which libvirt cannot do). The network is made
transient-free: defined (persistent, autostarted) so that it comes back with libvirtd.
Entries change live (``virNetworkUpdate``, live and config), never by redefining a
running network: its guests keep their links.
"""

from __future__ import annotations

import logging
import time

import libvirt

from labs.drivers.base import GroupNetworkSpec, HypervisorError, NetworkHost
from labs.drivers.libvirt import vxlan
from labs.drivers.libvirt.errors import error_code
from labs.drivers.libvirt.xml import (
    GROUP_FILTER,
    GROUP_FILTER_IPV4,
    dhcp_host_xml,
    dns_host_xml,
    firewall_filters_xml,
    group_filters_xml,
    network_hosts,
    network_xml,
)

log = logging.getLogger(__name__)

_UPDATE = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
_CONFIG_ONLY = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


class NetworksMixin:
    """The group-network half of :class:`labs.drivers.libvirt.driver.LibvirtDriver`."""

    def _network(self, name: str) -> libvirt.virNetwork | None:
        with self._errors(f"looking up network {name}"):
            try:
                return self._conn.networkLookupByName(name)
            except libvirt.libvirtError as error:
                if error_code(error) == libvirt.VIR_ERR_NO_NETWORK:
                    return None
                raise

    def _filters_ensure(self, spec: GroupNetworkSpec | None = None) -> None:
        """The group NICs' nwfilters, (re)defined, and the group's firewall filters when
        ``spec`` has a firewall: defining is idempotent, and a changed filter reaches
        running NICs at once (libvirt instantiates it again on each)."""
        self._filters_define((GROUP_FILTER_IPV4, GROUP_FILTER), group_filters_xml)
        if spec is not None and spec.firewall is not None:
            name = spec.firewall_filter
            openings = spec.firewall
            self._filters_define(
                (f"{name}-gw", name), lambda uuids: firewall_filters_xml(name, openings, uuids)
            )

    def _filters_define(self, names, build) -> None:
        """Define the filters ``build(uuids)`` returns (in ``names``' order, the inner one
        first: libvirt refuses a reference to a filter it does not know)."""
        with self._errors(f"defining the nwfilters {', '.join(names)}"):
            uuids = {}
            for name in names:
                try:
                    uuids[name] = self._conn.nwfilterLookupByName(name).UUIDString()
                except libvirt.libvirtError as error:
                    if error_code(error) == libvirt.VIR_ERR_NO_SUPPORT:
                        log.warning("host %s has no nwfilter support", self.host)
                        return
                    if error_code(error) != libvirt.VIR_ERR_NO_NWFILTER:
                        raise
            for xml in build(uuids):
                try:
                    self._conn.nwfilterDefineXML(xml)
                except libvirt.libvirtError as error:
                    # libvirt's test driver has no nwfilters. A real host always has
                    # them, and a NIC naming a missing filter does not start: this fails
                    # closed.
                    if error_code(error) != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                    log.warning("host %s has no nwfilter support", self.host)
                    return

    def firewall_apply(self, spec: GroupNetworkSpec) -> float:
        """The group's firewall filters here redefined to ``spec.firewall``: libvirt
        applies them to every running NIC of the group on this host before it returns."""
        started = time.monotonic()
        self._filters_ensure(spec)
        seconds = time.monotonic() - started
        log.info("firewall %s on %s applied in %.3f s", spec.firewall_filter, self.host, seconds)
        return seconds

    def _firewall_remove(self, spec: GroupNetworkSpec) -> None:
        """The group's firewall filters gone (its last NIC here is gone); one still in
        use (a VM defined here meanwhile) stays."""
        name = spec.firewall_filter
        for filter_name in (name, f"{name}-gw"):
            try:
                self._conn.nwfilterLookupByName(filter_name).undefine()
            except libvirt.libvirtError as error:
                log.info("nwfilter %s on %s kept: %s", filter_name, self.host, error)
                return

    def network_ensure(self, spec: GroupNetworkSpec) -> float:
        """The group's network here holds exactly ``spec.hosts``, runs, and (when the
        group has other hosts) is joined to theirs by VXLAN. Idempotent."""
        started = time.monotonic()
        self._filters_ensure(spec)
        net = self._network(spec.name)
        with self._errors(f"making network {spec.name}"):
            if net is None:
                net = self._conn.networkDefineXML(network_xml(spec))
                log.info("defined network %s on %s", spec.name, self.host)
            else:
                self._network_sync(net, spec)
            if not net.isActive():
                net.create()
                log.info("started network %s on %s", spec.name, self.host)
            net.setAutostart(1)
            bridge = net.bridgeName()
        if bridge != spec.bridge:
            raise HypervisorError(
                f"network {spec.name} on host {self.host} uses bridge {bridge}, not {spec.bridge}"
            )
        if spec.tunnel is not None:
            vxlan.tunnel_ensure(spec.tunnel, bridge=spec.bridge, mtu=spec.mtu, host=self.host)
        return time.monotonic() - started

    def _network_sync(self, net: libvirt.virNetwork, spec: GroupNetworkSpec) -> None:
        """Entries added and removed to match ``spec`` (live when it runs)."""
        flags = _UPDATE if net.isActive() else _CONFIG_ONLY
        have = network_hosts(net.XMLDesc(0))
        want = set(spec.hosts)
        # Stale entries out first: one MAC or address in two entries is refused.
        for host in have["dhcp"] - want:
            self._update(net, "delete", libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, host, flags)
        for host in sorted(want - have["dhcp"], key=lambda h: h.ip):
            self._update(net, "add", libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, host, flags)
        wanted_dns = {(h.ip, h.name) for h in want}
        for ip, name in have["dns"] - wanted_dns:
            self._dns_delete(net, ip, name, flags)
        for host in sorted(want, key=lambda h: h.ip):
            if (host.ip, host.name) not in have["dns"]:
                self._update(net, "add", libvirt.VIR_NETWORK_SECTION_DNS_HOST, host, flags)

    def _update(self, net, command: str, section: int, host: NetworkHost, flags: int) -> None:
        self._update_xml(net, command, section, _entry_xml(section, host), host.name, flags)

    def _update_xml(self, net, command: str, section: int, xml: str, what: str, flags: int):
        cmd = (
            libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
            if command == "add"
            else libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE
        )
        net.update(cmd, section, -1, xml, flags)
        log.info("network %s on %s: %s %s", net.name(), self.host, command, what)

    def _dns_delete(self, net, ip: str, name: str, flags: int) -> None:
        xml = dns_host_xml(ip=ip, name=name)
        self._update_xml(net, "delete", libvirt.VIR_NETWORK_SECTION_DNS_HOST, xml, name, flags)

    def network_host_remove(self, spec: GroupNetworkSpec, host: NetworkHost) -> float:
        """``host``'s DHCP and DNS entries out of the group's network here (gone: fine)."""
        started = time.monotonic()
        net = self._network(spec.name)
        if net is None:
            return time.monotonic() - started
        with self._errors(f"removing {host.name} from network {spec.name}"):
            flags = _UPDATE if net.isActive() else _CONFIG_ONLY
            have = network_hosts(net.XMLDesc(0))
            for old in have["dhcp"]:
                if old.mac == host.mac or old.ip == host.ip:
                    self._update(
                        net, "delete", libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, old, flags
                    )
            for ip, name in have["dns"]:
                if ip == host.ip:
                    self._dns_delete(net, ip, name, flags)
        return time.monotonic() - started

    def network_remove(self, spec: GroupNetworkSpec) -> float:
        """The group's network and tunnel gone from this host (no VM of it is here)."""
        started = time.monotonic()
        if spec.tunnel is not None:
            vxlan.tunnel_remove(spec.tunnel, bridge=spec.bridge, host=self.host)
        net = self._network(spec.name)
        if net is not None:
            with self._errors(f"removing network {spec.name}"):
                if net.isActive():
                    net.destroy()
                net.undefine()
            log.info("removed network %s from %s", spec.name, self.host)
        if spec.firewall is not None:
            self._firewall_remove(spec)
        return time.monotonic() - started

    def network_names(self) -> list[str]:
        """The group networks this host has (tests, reconcile)."""
        with self._errors("listing networks"):
            return sorted(
                n.name() for n in self._conn.listAllNetworks(0) if n.name()[:5] == "stx-g"
            )


def _entry_xml(section: int, host: NetworkHost) -> str:
    if section == libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST:
        return dhcp_host_xml(host)
    return dns_host_xml(ip=host.ip, name=host.name)
