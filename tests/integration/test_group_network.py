"""A private network per group on real guests, on the production path, inside network
namespaces this test makes (DESIGN.md, Network safety): two test hosts, each a libvirtd of
its own in its own network and mount namespace (scripts/second-libvirtd.sh with
SECOND_LIBVIRTD_NETNS), reached from here through its unix socket; the namespaces joined
by a veth pair whose two ends live in them (underlay 10.254.0.0/24, nothing routed out).
Each host's group networks, dnsmasq, VXLAN devices and the guests' SSH forwards are its
namespace's: SSH to a guest is `ip netns exec <ns> ssh ...`.

Group A has vm1 on host 1 and vm2 on host 2 (VXLAN between them), group B one VM on host
1. Three guests, 512 MiB each.
"""

import json
import subprocess
import time
from dataclasses import replace

import pytest
from django.db import connection

from labs.choices import ACTIVE_OPERATION_STATUSES, OperationKind
from labs.compute import firewall, networks, requests
from labs.drivers.base import NetworkHost
from labs.drivers.libvirt import vxlan
from labs.drivers.registry import driver_for
from labs.models import GroupNetwork, Host, Operation, Vm, VmTemplate
from labs.tooling.netns_hosts import GUEST_PING, NetnsHost, join, run
from tests.integration.conftest import (
    PREFIX,
    RUN,
    SSH_PORT_MIN,
    Worker,
    _db_env,
    approve_new_group,
    keypair,
    virsh_on,
    wait_for,
    wait_operation,
)

pytestmark = pytest.mark.integration

UNDERLAY = {"a": "10.254.0.1", "b": "10.254.0.2"}


@pytest.fixture(scope="module")
def netns_hosts():
    """Two test hosts in namespaces of their own, joined by a veth pair made inside them:
    nothing is made in the machine's own namespace. Removed even when the test fails."""
    hosts = [NetnsHost(RUN, "a", PREFIX), NetnsHost(RUN, "b", PREFIX)]
    try:
        for host in hosts:
            host.start()
        join(hosts, UNDERLAY, RUN)
        yield hosts
    finally:
        for host in hosts:
            host.stop()


@pytest.mark.sqlite_pass_only  # guests' packets do not touch the database; the rows are the
# unit suite's (tests/compute/test_networks.py), which runs on PostgreSQL too
def test_group_vms_on_two_hosts_reach_each_other_by_name_and_another_group_sees_nothing(
    transactional_db, netns_hosts, base_image, course, alice, carol, ines, tmp_path
):
    ns_a, ns_b = netns_hosts
    host_rows = []
    for index, ns in enumerate(netns_hosts):
        host_rows.append(
            Host.objects.create(
                name=f"nh{RUN}{ns.tag}",
                uri=ns.uri,
                vcpus=4,
                memory_mib=8192,
                disk_gib=100,
                virt_type="qemu",
                network_mode="user",
                ssh_port_min=SSH_PORT_MIN + 50 * index,
                ssh_port_max=SSH_PORT_MIN + 50 * index + 49,
                storage_dir=str(ns.storage),
                group_networks=True,
                tunnel_address=UNDERLAY[ns.tag],
                netns=ns.netns,
            )
        )
    h1, h2 = host_rows
    from labs.models import Image

    image = Image.objects.create(
        name="debian-12", os="Debian 12", login_user="student", path=str(base_image), size_gib=2
    )
    VmTemplate.objects.create(
        course=course, image=image, count=1, vcpus=1, memory_mib=512, disk_gib=4, quota_vms=2
    )
    workers = [
        Worker(connection.settings_dict["NAME"], _db_env(), host_name=h.name) for h in host_rows
    ]
    try:
        for w in workers:
            w.start()
        key_a, public_a = keypair(tmp_path / "a_key")
        key_b, public_b = keypair(tmp_path / "b_key")

        # A's vm1 on host 1, vm2 on host 2, B's VM on host 1: placement chooses among
        # the hosts that are enabled.
        Host.objects.filter(pk=h2.pk).update(enabled=False)
        vm1, op1 = approve_new_group(
            course, by=alice, reviewer=ines, name="Alpha", public_key=public_a
        )
        Host.objects.filter(pk=h1.pk).update(enabled=False)
        Host.objects.filter(pk=h2.pk).update(enabled=True)
        vm2 = requests.vm_create(group=vm1.group, by=alice)
        op2 = Operation.objects.get(vm=vm2, kind=OperationKind.PROVISION)
        Host.objects.filter(pk=h1.pk).update(enabled=True)
        Host.objects.filter(pk=h2.pk).update(enabled=False)
        vmb, opb = approve_new_group(
            course, by=carol, reviewer=ines, name="Bravo", public_key=public_b
        )
        Host.objects.filter(pk=h2.pk).update(enabled=True)
        started = time.monotonic()
        for op in (op1, op2, opb):
            wait_operation(op, timeout=180)
        for vm in (vm1, vm2, vmb):
            vm.refresh_from_db()
        assert (vm1.host, vm2.host, vmb.host) == (h1, h2, h1)
        net_a = GroupNetwork.objects.get(group=vm1.group)
        net_b = GroupNetwork.objects.get(group=vmb.group)

        # What the hosts hold: A's network on both, B's on host 1 only, tunnels to the peer.
        assert virsh_on(ns_a.uri, "net-list", "--name").stdout.split() == sorted(
            [net_a.libvirt_name, net_b.libvirt_name]
        )
        assert virsh_on(ns_b.uri, "net-list", "--name").stdout.split() == [net_a.libvirt_name]
        assert vxlan.tunnel_peers(ns_a.netns, net_a.bridge) == [(UNDERLAY["b"], 4789)]
        wait_for(
            lambda: vxlan.tunnel_peers(ns_b.netns, net_a.bridge) == [(UNDERLAY["a"], 4789)],
            timeout=30,
            what="host 2's VXLAN to host 1",
        )
        assert vxlan.tunnel_peers(ns_a.netns, net_b.bridge) == []

        for ns, vm, key in ((ns_a, vm1, key_a), (ns_b, vm2, key_a), (ns_a, vmb, key_b)):
            ns.wait_for_ssh(key, vm.ssh_port)
        booted = time.monotonic() - started

        def on(ns, vm, key, command, **kw):
            return ns.ssh(key, vm.ssh_port, command, **kw)

        # Each got its own address by DHCP on its group NIC.
        for ns, vm, key in ((ns_a, vm1, key_a), (ns_b, vm2, key_a), (ns_a, vmb, key_b)):
            addresses = json.loads(on(ns, vm, key, "ip -4 -j addr show dev grp0").stdout)
            assert [a["local"] for a in addresses[0]["addr_info"]] == [vm.group_ip]
            assert addresses[0]["mtu"] == 1450

        # vm1 resolves vm2 and pings it by name, across the VXLAN.
        resolved = on(ns_a, vm1, key_a, "getent hosts vm2").stdout.split()
        assert resolved[:2] == [vm2.group_ip, "vm2"]
        ping = on(ns_a, vm1, key_a, "sudo python3 - vm2", input=GUEST_PING)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        rtts = [float(x) for x in ping.stdout.split()[1:]]
        back = on(ns_b, vm2, key_a, "sudo python3 - vm1", input=GUEST_PING)
        assert back.returncode == 0, back.stdout + back.stderr

        # DHCP: a fresh lease on vm2's group NIC, timed in the guest.
        dhcp = on(
            ns_b, vm2, key_a,
            "sudo dhclient -r grp0 && s=$(date +%s.%N) && sudo dhclient -1 grp0 && "
            "e=$(date +%s.%N) && echo $s $e && ip -4 -o addr show dev grp0",
            timeout=60,
        )  # fmt: skip
        assert dhcp.returncode == 0, dhcp.stderr
        first, last = dhcp.stdout.split()[:2]
        dhcp_s = float(last) - float(first)
        assert vm2.group_ip in dhcp.stdout

        # A spoofed source address from vm1: nothing gets through (clean-traffic).
        spoof = net_a.subnet.rsplit(".", 1)[0] + ".99"
        on(ns_a, vm1, key_a, f"sudo ip addr add {spoof}/24 dev grp0")
        spoofed = on(ns_a, vm1, key_a, f"sudo python3 - {vm2.group_ip} {spoof}", input=GUEST_PING)
        assert spoofed.returncode == 1, spoofed.stdout
        on(ns_a, vm1, key_a, f"sudo ip addr del {spoof}/24 dev grp0")

        # The host answers DHCP and DNS on its group address, nothing else: a TCP port it
        # listens on there is closed to the guest, DNS's TCP port open (the control).
        gateway = net_a.gateways[str(h1.pk)]
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns_a.netns, "python3", "-c",
             "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
             "socket.SO_REUSEADDR,1); s.bind((__import__('sys').argv[1], 8089)); s.listen();"
             " time.sleep(120)", gateway],
        )  # fmt: skip
        try:
            time.sleep(0.5)
            probe = "timeout 4 bash -c 'exec 3<>/dev/tcp/{}/{}' && echo open || echo closed"
            assert on(ns_a, vm1, key_a, probe.format(gateway, 8089)).stdout.strip() == "closed"
            assert on(ns_a, vm1, key_a, probe.format(gateway, 53)).stdout.strip() == "open"
        finally:
            listener.kill()
            listener.wait()

        # Group B: its own subnet, no answer from A, no ARP entry of A, no name of A's.
        assert vmb.group_ip.rsplit(".", 1)[0] != vm1.group_ip.rsplit(".", 1)[0]
        assert on(ns_a, vmb, key_b, "getent hosts vm2").returncode != 0
        on(ns_a, vmb, key_b, f"sudo ip route add {net_a.subnet} dev grp0")
        for target in (vm1.group_ip, vm2.group_ip, gateway):
            tried = on(ns_a, vmb, key_b, f"sudo python3 - {target}", input=GUEST_PING)
            assert tried.returncode == 1, tried.stdout
        neighbours = on(ns_a, vmb, key_b, "ip neigh show dev grp0").stdout.lower()
        assert vm1.group_mac not in neighbours and vm2.group_mac not in neighbours

        print(
            f"\ngroup network: boot to SSH {booted:.0f} s; vm1->vm2 RTT {rtts} ms; "
            f"DHCP {dhcp_s:.2f} s"
        )

        # An entry added live on every host of the group (what a new VM of the group gets;
        # a guest's resolver may be any host's dnsmasq, the VXLAN makes them one segment):
        # vm1 resolves it at once; taken out, it is gone.
        extra = NetworkHost(
            mac="52:54:01:ff:ff:01", ip=net_a.subnet.rsplit(".", 1)[0] + ".200", name="vm9"
        )
        specs = [(h, networks.network_spec(group=vm1.group, host=h)) for h in (h1, h2)]
        add_s = []
        for h, spec in specs:
            driver = driver_for(h)
            added = time.monotonic()
            driver.network_ensure(replace(spec, hosts=(*spec.hosts, extra)))
            add_s.append(round(time.monotonic() - added, 2))
        assert on(ns_a, vm1, key_a, "getent hosts vm9").stdout.split()[:1] == [extra.ip]
        for h, spec in specs:
            driver_for(h).network_ensure(spec)
            driver_for(h).close()
        assert on(ns_a, vm1, key_a, "getent hosts vm9").returncode != 0

        sync_times = [
            op.params.get("timings", {}).get("group_network_s")
            for op in Operation.objects.filter(kind=OperationKind.NETWORK_SYNC)
        ]
        print(
            f"group network: entry added live {add_s} s; network_sync {sync_times}; "
            f"provision network step {[o.params.get('timings') for o in (op1, op2, opb)]}"
        )
        assert Vm.objects.filter(group=vm1.group, group_ip__isnull=False).count() == 2

        _firewall_opened_and_closed(ns_a, ns_b, vm1, vm2, key_a, alice, net_a, h1, on, probe)
    finally:
        for w in workers:
            w.stop()
    # The networks are what the group networks code made; nothing in the machine's own
    # namespace (the bridges of this run are in the test namespaces only).
    own = run("ip", "-o", "link", "show").stdout
    assert f"stxg{vm1.group_id}" not in own and f"vxg{vm1.group_id}" not in own
    assert networks.MTU == 1450


def _reached_within(check, *, want: bool, timeout: float = 30) -> float:
    """Seconds until ``check()`` (a fresh connection's outcome) is ``want``."""
    started = time.monotonic()
    wait_for(lambda: check() == want, timeout=timeout, interval=0.2, what=f"reachable={want}")
    return time.monotonic() - started


def _firewall_opened_and_closed(ns_a, ns_b, vm1, vm2, key_a, alice, net_a, h1, on, probe):
    """The group's firewall (labs/compute/firewall.py) on the running guests: vm1 serves
    on tcp 8080; vm2 (the other host) cannot reach it until a member opens
    ``tcp 8080 from the group``, and cannot once it is removed again; SSH and ping from
    the group and SSH from the gateway are open by default, the gateway's 8080 is not."""
    serve = "python3 -m http.server 8080 --bind 0.0.0.0"
    on(ns_a, vm1, key_a, f"setsid nohup {serve} >/dev/null 2>&1 < /dev/null &")
    wait_for(
        lambda: on(ns_a, vm1, key_a, probe.format("127.0.0.1", 8080)).stdout.strip() == "open",
        timeout=20,
        what="vm1's web server",
    )
    quick = "timeout 1.5 bash -c 'exec 3<>/dev/tcp/{}/{}' && echo open || echo closed"

    def vm2_reaches(port: int) -> bool:
        return on(ns_b, vm2, key_a, quick.format("vm1", port)).stdout.strip() == "open"

    def gateway_reaches(port: int) -> bool:
        tried = run("ip", "netns", "exec", ns_a.netns, "timeout", "2", "bash", "-c",
                    f"exec 3<>/dev/tcp/{vm1.group_ip}/{port}", check=False)  # fmt: skip
        return tried.returncode == 0

    assert not vm2_reaches(8080)  # closed by default
    assert vm2_reaches(22)  # SSH from the group: a default rule
    assert gateway_reaches(22)  # SSH from the gateway: a default rule
    assert not gateway_reaches(8080)  # the host's own packets get no answer on 8080

    def settled():
        return not Operation.objects.filter(
            vm__group=vm1.group, status__in=ACTIVE_OPERATION_STATUSES
        ).exists()

    wait_for(settled, timeout=60, what="group A's operations to finish")
    asked = time.monotonic()
    rule = firewall.rule_add(
        group=vm1.group, by=alice, protocol="tcp", port_from="8080", source="group", note="web"
    )
    opened_s = time.monotonic() - asked + _reached_within(lambda: vm2_reaches(8080), want=True)
    ops = list(Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC).order_by("pk"))
    assert {op.vm.host_id for op in ops} == {vm1.host_id, vm2.host_id}
    for op in ops:
        wait_operation(op, timeout=60)
        assert op.requested_by == alice
    wait_for(settled, timeout=60, what="the firewall_sync operations")
    asked = time.monotonic()
    firewall.rule_remove(rule=rule, by=alice)
    closed_s = time.monotonic() - asked + _reached_within(lambda: vm2_reaches(8080), want=False)
    assert vm2_reaches(22)  # the rest stays as it was
    apply_s = [
        op.params.get("timings", {}).get("firewall_s")
        for op in Operation.objects.filter(kind=OperationKind.FIREWALL_SYNC).order_by("pk")
    ]
    print(
        f"firewall: tcp 8080 from the group opened in {opened_s:.2f} s, closed in "
        f"{closed_s:.2f} s (request to a peer's new connection); filter applied per host "
        f"{apply_s} s"
    )
