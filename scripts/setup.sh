#!/usr/bin/env bash
# Install everything nubis needs on a fresh Debian/Ubuntu machine:
# system packages (etcd, Redis, libvirt, QEMU, build tools) and a virtualenv
# at .venv with nubis and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  etcd-server etcd-client redis-server
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-utils
  gcc python3-dev python3-venv iproute2 procps
  dnsmasq-base dnsmasq-utils nftables busybox
  iptables ebtables
  docker.io docker-compose debootstrap
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "nubis is installed in .venv (activate with: . .venv/bin/activate)"
