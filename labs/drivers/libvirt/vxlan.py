"""A group's VXLAN device on one host, by netlink (pyroute2): libvirt makes bridges but no
VXLAN devices. Run by the worker that serves the host's queue, in the host's network
namespace (``TunnelSpec.netns``; empty in production: the worker's own), where the
host's libvirtd keeps the group's bridge.

``vxg<group>`` carries the group's VNI from this host's underlay address and UDP port,
learns nothing (``nolearning``) and floods broadcast, unknown unicast and multicast to
every peer by head-end replication: one all-zero FDB entry per peer host. No multicast
routing is needed in the underlay, which is what a campus network usually gives. MTU 1450:
the 50 bytes of VXLAN over IPv4 inside a 1500-byte underlay.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from labs.drivers.base import HypervisorError, TunnelSpec

log = logging.getLogger(__name__)

ALL_ZERO = "00:00:00:00:00:00"


def device_name(bridge: str) -> str:
    """``stxg12`` -> ``vxg12`` (interface names have 15 characters at most)."""
    return "vx" + bridge[3:]


@contextmanager
def _ipr(netns: str):
    """A netlink socket in ``netns`` ("": this process's own).

    The socket is made while this thread is in the namespace (setns, then back): a
    netlink socket belongs to the namespace it was made in. Not ``IPRoute(netns=...)``,
    which makes it in a forked child: in a Celery prefork worker the pool process was
    then ended by SIGTERM.
    """
    from pyroute2 import IPRoute, NetlinkError
    from pyroute2 import netns as namespaces

    try:
        if netns:
            namespaces.pushns(netns)
            try:
                ipr = IPRoute()
            finally:
                namespaces.popns()
        else:
            ipr = IPRoute()
    except (OSError, NetlinkError) as error:
        raise HypervisorError(f"cannot open network namespace {netns!r}: {error}") from error
    try:
        yield ipr
    except NetlinkError as error:
        raise HypervisorError(f"netlink in namespace {netns or '(own)'}: {error}") from error
    finally:
        ipr.close()


def _index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def tunnel_ensure(tunnel: TunnelSpec, *, bridge: str, mtu: int, host: str) -> None:
    """``vxg<id>`` exists with the right VNI, local address and port, is up and enslaved
    to ``bridge``, and floods to exactly ``tunnel.peers``."""
    name = device_name(bridge)
    with _ipr(tunnel.netns) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            raise HypervisorError(f"host {host} has no bridge {bridge} for the group's VXLAN")
        index = _index(ipr, name)
        if index is not None and not _matches(ipr, index, tunnel):
            ipr.link("del", index=index)
            index = None
        if index is None:
            ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=tunnel.vni,
                vxlan_local=tunnel.local,
                vxlan_port=tunnel.port,
                vxlan_learning=0,
            )
            index = _index(ipr, name)
            log.info("host %s: VXLAN %s (VNI %s) made", host, name, tunnel.vni)
        ipr.link("set", index=index, mtu=mtu, master=bridge_index, state="up")
        want = {(p.address, p.port) for p in tunnel.peers}
        have = set()
        for entry in ipr.fdb("dump", ifindex=index):
            if entry.get("lladdr") == ALL_ZERO or entry.get_attr("NDA_LLADDR") == ALL_ZERO:
                dst = entry.get_attr("NDA_DST")
                port = entry.get_attr("NDA_PORT") or tunnel.port
                if dst:
                    have.add((dst, port))
        for dst, port in have - want:
            ipr.fdb("del", ifindex=index, lladdr=ALL_ZERO, dst=dst, port=port)
        for dst, port in sorted(want - have):
            ipr.fdb("append", ifindex=index, lladdr=ALL_ZERO, dst=dst, port=port)
            log.info("host %s: %s floods to %s:%s", host, name, dst, port)


def _matches(ipr, index: int, tunnel: TunnelSpec) -> bool:
    (link,) = ipr.get_links(index)
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return (
        data.get_attr("IFLA_VXLAN_ID") == tunnel.vni
        and data.get_attr("IFLA_VXLAN_LOCAL") == tunnel.local
        and data.get_attr("IFLA_VXLAN_PORT") == tunnel.port
    )


def tunnel_remove(tunnel: TunnelSpec, *, bridge: str, host: str) -> None:
    """The group's VXLAN device gone (gone already: fine)."""
    name = device_name(bridge)
    with _ipr(tunnel.netns) as ipr:
        index = _index(ipr, name)
        if index is not None:
            ipr.link("del", index=index)
            log.info("host %s: VXLAN %s removed", host, name)


def tunnel_peers(netns: str, bridge: str) -> list[tuple[str, int]]:
    """Where the group's VXLAN device on this host floods to, (address, UDP port) each
    (the kernel leaves the port out of an entry that uses the device's own)."""
    with _ipr(netns) as ipr:
        index = _index(ipr, device_name(bridge))
        if index is None:
            return []
        (link,) = ipr.get_links(index)
        own = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA").get_attr("IFLA_VXLAN_PORT")
        return sorted(
            (e.get_attr("NDA_DST"), e.get_attr("NDA_PORT") or own)
            for e in ipr.fdb("dump", ifindex=index)
            if e.get_attr("NDA_DST")
        )
