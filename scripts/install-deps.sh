#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the Debian packages listed
# in scripts/deps/apt.txt and a Python virtual environment (.venv) with the packages in
# scripts/deps/requirements.txt. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t apt_pkgs < <(grep -v -e '^#' -e '^$' scripts/deps/apt.txt)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum scripts/deps/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/deps/requirements.txt
  echo "$want" > "$stamp"
fi
echo "install-deps: ready"
