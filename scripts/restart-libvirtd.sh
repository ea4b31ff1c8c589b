#!/usr/bin/env bash
# Restart this machine's libvirtd the way scripts/setup-libvirt.sh started it (systemd's
# unit where systemd runs, else the daemon it started by hand, ended by the PID in its own
# pid file), and wait until it answers again. Running guests live on: QEMU does not
# depend on libvirtd, which reconnects to their monitors when it starts.
# For the chaos tests (tests/integration/test_libvirtd_restart.py) and bench/chaos.py.
set -euo pipefail
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo

if [[ -d /run/systemd/system ]]; then
  $sudo systemctl restart libvirtd.service
else
  pidfile=/run/libvirtd.pid
  pid=$(cat "$pidfile")
  # Only the libvirtd that pid file names, and only if it is libvirtd.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == libvirtd ]] || { echo "no libvirtd at $pid" >&2; exit 1; }
  $sudo kill -TERM "$pid"
  gone() { local state; state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 0; [[ $state == Z* ]]; }
  for _ in $(seq 150); do
    gone && break
    sleep 0.1
  done
  gone || { echo "libvirtd $pid did not end" >&2; exit 1; }
  $sudo libvirtd -d
fi
for _ in $(seq 100); do
  virsh -q -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "libvirtd did not answer after its restart" >&2
exit 1
