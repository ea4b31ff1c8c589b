#!/usr/bin/env bash
# Install libvirt + QEMU and make sure libvirtd runs, WITHOUT libvirt's `default` NAT network.
# Stratus guests here use QEMU user-mode networking only (see docs/hypervisor.md, "Networking").
set -euo pipefail

# qemu-system-common (a dependency of qemu-system-x86, named for what it brings): Debian
# 12's /usr/lib/qemu/virtiofsd, which libvirt starts for the shared files (docs/storage.md).
packages=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86
          qemu-system-common qemu-utils)
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "Installing Debian packages: ${missing[*]}"
  # Keep the package scripts from starting libvirtd: it would autostart the NAT network.
  guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$guard" >/dev/null
    $sudo chmod 755 "$guard"
  fi
  trap '[[ -n $guard ]] && $sudo rm -f "$guard"' EXIT
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# /dev/kvm as udev would leave it (root:kvm 0660). Where udev does not run, the device is
# root-only; libvirt's QEMU probe (run as root) then sees KVM, its check as libvirt-qemu does
# not, and every libvirt call re-probes QEMU: a define took 87 s. Guests here still run
# under TCG (domain type qemu); this only keeps libvirt's capability cache valid.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
  $sudo chgrp kvm /dev/kvm
  $sudo chmod 0660 /dev/kvm
fi

# Never let the default network start with the daemon.
$sudo rm -f /etc/libvirt/qemu/networks/autostart/default.xml

if ! virsh -q -c qemu:///system version >/dev/null 2>&1; then
  if [[ -d /run/systemd/system ]]; then
    $sudo systemctl start virtlogd.socket libvirtd.socket libvirtd.service
  else
    pgrep -x virtlogd >/dev/null || $sudo virtlogd -d
    pgrep -x libvirtd >/dev/null || $sudo libvirtd -d
  fi
  for _ in $(seq 50); do
    virsh -q -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
fi
virsh -q -c qemu:///system version >/dev/null || { echo "libvirtd did not start" >&2; exit 1; }

# If the default network exists (and a package script started it), stop it for good.
if virsh -q -c qemu:///system net-info default >/dev/null 2>&1; then
  if virsh -q -c qemu:///system net-info default | grep -Eq '^Active:\s+yes'; then
    $sudo virsh -q -c qemu:///system net-destroy default >/dev/null
  fi
  $sudo virsh -q -c qemu:///system net-autostart --disable default >/dev/null
fi
