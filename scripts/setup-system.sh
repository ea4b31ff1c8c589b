#!/usr/bin/env bash
# Install the Debian packages Stratus needs, only those that are missing.
# libvirt and QEMU come from scripts/setup-libvirt.sh, which also starts the daemons.
#   scripts/setup-system.sh run    packages to run the site
#   scripts/setup-system.sh test   packages to run the test suite (adds Chromium, ssh-keygen,
#                                  docker-compose for linting the compose file)
set -euo pipefail

profile=${1:-run}
packages=(ca-certificates make openssh-client
          # building the base image (labs/tooling/images.py BUILD_PACKAGES)
          mmdebstrap debian-archive-keyring qemu-utils e2fsprogs fdisk grub-common
          # group networks: libvirt runs dnsmasq for each group's DHCP and DNS
          dnsmasq-base)
case $profile in
  run) ;;
  # docker-compose lints docker-compose.yml (tests/test_deploy_files.py); no engine needed.
  # openssh-server: the tests run sshd (never the system's service) on a second libvirtd,
  # as the console channel to another host (tests/integration/conftest.py).
  test) packages+=(chromium fonts-dejavu-core docker-compose openssh-server) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

# Node's npm installs noVNC (package.json); Debian's nodejs is enough when none is present.
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "Installing Debian packages: ${missing[*]}"
  # Keep the package scripts from starting services (sshd would listen on every address).
  guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$guard" >/dev/null
    $sudo chmod 755 "$guard"
    trap '$sudo rm -f "$guard"' EXIT  # also when apt-get fails
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [[ -z $guard ]] || $sudo rm -f "$guard"
fi

# Redis on loopback (Celery's broker): use the one running, else install and start one.
redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
if ! redis_up; then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  if ! command -v redis-server >/dev/null; then
    echo "Installing Debian package: redis-server"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
  fi
  if ! redis_up; then
    if [[ -d /run/systemd/system ]]; then
      $sudo systemctl start redis-server
    else
      # Queued operations' messages live here: keep them on disk (append-only file under
      # var/), so a restart of this Redis loses none (the outbox would resend them anyway).
      mkdir -p var/redis
      $sudo redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
        --appendonly yes --appendfsync everysec --dir "$PWD/var/redis"
    fi
    for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  fi
  redis_up || { echo "Redis did not start on 127.0.0.1:6379" >&2; exit 1; }
fi
