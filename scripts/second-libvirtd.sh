#!/usr/bin/env bash
# A second hypervisor on this machine: a libvirtd of its own, for trying and testing
# Stratus with two hosts (migration, placement, drain) where there is one machine.
#
#   scripts/second-libvirtd.sh start [STATE_DIR]   # prints its URI
#   scripts/second-libvirtd.sh stop  [STATE_DIR]   # its guests are destroyed first
#
# It runs in a private mount namespace with its own /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind-mounted from STATE_DIR,
# default /var/lib/stratus/hv2), listens on 127.0.0.2:16510 only (TCP without auth: the
# loopback, never a network), has its own host UUID, migration and display ports, and no
# network definitions at all (never a NAT network; see ../shared/LIBVIRT-NOTES.md). Files
# outside those directories (base images, VM storage directories) are the machine's own,
# as they would be on a host that has the same images.
#
# SECOND_LIBVIRTD_NETNS=NAME runs it inside the existing network namespace NAME as well
# (`ip netns add NAME` first): a test host whose bridges, dnsmasq and guests' forwards are
# that namespace's, never the machine's. It then listens on no TCP port at all and is
# reached through its unix socket: the URI printed is qemu+unix:///system?socket=....
set -euo pipefail

action=${1:?usage: $0 start|stop [STATE_DIR]}
state=${2:-/var/lib/stratus/hv2}
address=${SECOND_LIBVIRTD_ADDRESS:-127.0.0.2}
port=${SECOND_LIBVIRTD_PORT:-16510}
netns=${SECOND_LIBVIRTD_NETNS:-}
uri="qemu+tcp://$address:$port/system"
[[ -z $netns ]] || uri="qemu+unix:///system?socket=$state/run/libvirt-sock"
pidfile=$state/libvirtd.pid
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root (it mounts and starts a daemon)" >&2; exit 1; }

running() {
  [[ -f $pidfile ]] && [[ $(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null) == libvirtd ]]
}

answering() { virsh -q -c "$uri" version >/dev/null 2>&1; }

case $action in
start)
  if running && answering; then
    echo "$uri"
    exit 0
  fi
  mkdir -p "$state"/{run,lib,cache,log}
  if [[ ! -d $state/etc ]]; then
    cp -a /etc/libvirt "$state/etc"
    # Nothing of the first daemon's: no domains, pools or networks (no NAT network, ever).
    rm -rf "$state/etc/qemu" "$state/etc/storage" "$state/etc/secrets"
    mkdir -p "$state/etc/qemu" "$state/etc/storage"
    cat /proc/sys/kernel/random/uuid >"$state/host_uuid"
  fi
  # Written at every start from the machine's own files, so a changed address or port
  # takes effect; the host UUID stays the host's.
  { cat /etc/libvirt/libvirtd.conf; cat <<EOF

# scripts/second-libvirtd.sh: the second host, on the loopback only
listen_tls = 0
$(if [[ -n $netns ]]; then echo "listen_tcp = 0  # in network namespace $netns: unix socket only"; else
  printf 'listen_tcp = 1\nlisten_addr = "%s"\ntcp_port = "%s"\nauth_tcp = "none"' "$address" "$port"; fi)
host_uuid = "$(cat "$state/host_uuid")"
EOF
  } >"$state/etc/libvirtd.conf"
  { cat /etc/libvirt/qemu.conf; cat <<EOF

# scripts/second-libvirtd.sh: its own ports, no cgroups of its own, logs in files
migration_address = "$address"
migration_host = "$address"
migration_port_min = 49300
migration_port_max = 49363
remote_display_port_min = 6900
remote_display_port_max = 6999
cgroup_controllers = [ ]
stdio_handler = "file"
EOF
  } >"$state/etc/qemu.conf"
  # The daemon keeps the namespace: the mounts exist for it and its QEMUs only.
  # `ip netns exec` (not nsenter) for a namespace: /sys then shows the namespace's own
  # interfaces, which libvirt reads to manage its bridges.
  in_netns=()
  listen=(--listen)
  if [[ -n $netns ]]; then
    in_netns=(ip netns exec "$netns")
    listen=()
  fi
  "${in_netns[@]}" unshare --mount --propagation private -- bash -euc '
    state=$1
    shift
    mount --bind "$state/etc" /etc/libvirt
    mount --bind "$state/run" /run/libvirt
    mount --bind "$state/lib" /var/lib/libvirt
    mount --bind "$state/cache" /var/cache/libvirt
    mount --bind "$state/log" /var/log/libvirt
    exec libvirtd "$@" --daemon --pid-file "$state/libvirtd.pid"
  ' _ "$state" "${listen[@]}"
  for _ in $(seq 100); do
    answering && { echo "$uri"; exit 0; }
    sleep 0.2
  done
  echo "$0: the second libvirtd did not answer on $uri; see $state/log" >&2
  exit 1
  ;;
stop)
  if answering; then
    for name in $(virsh -q -c "$uri" list --name); do
      virsh -q -c "$uri" destroy "$name" >/dev/null || true
    done
  fi
  if running; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 150); do
      state_of=$(ps -o stat= -p "$pid" 2>/dev/null) || break
      [[ $state_of == Z* ]] && break
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
  ;;
*)
  echo "usage: $0 start|stop [STATE_DIR]" >&2
  exit 2
  ;;
esac
