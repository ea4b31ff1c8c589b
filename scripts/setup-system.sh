#!/usr/bin/env bash
# Install the Debian packages Stratus needs, only those that are missing.
#   scripts/setup-system.sh run    packages to run the site
#   scripts/setup-system.sh test   packages to run the test suite (adds Chromium, ssh-keygen)
set -euo pipefail

profile=${1:-run}
packages=(ca-certificates make openssh-client)
case $profile in
  run) ;;
  test) packages+=(chromium fonts-dejavu-core) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "Installing Debian packages: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
