#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (Django 6 needs it). Debian 12 ships 3.11, so look
# for a newer interpreter on PATH first, then in pyenv's versions.
set -u
ok() { "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
for c in python3.13 python3.12 python3; do
  p=$(command -v "$c" 2>/dev/null) || continue
  ok "$p" && { echo "$p"; exit 0; }
done
for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
  [[ -x $p ]] && ok "$p" && { echo "$p"; exit 0; }
done
echo "Stratus needs Python 3.12 or newer (Django 6); none was found on PATH or in pyenv." >&2
exit 1
