#!/usr/bin/env bash
# Make the Debian bookworm base image nubis's Dockerfile builds on, without a
# container registry: debootstrap a minimal root file system from the Debian
# mirror this machine's apt uses and `docker import` it as nubis-base:bookworm.
# Does nothing when the image exists already (FORCE=1 makes it again).
set -euo pipefail

IMAGE="${NUBIS_BASE_IMAGE:-nubis-base:bookworm}"
SUITE=bookworm

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE exists"
  exit 0
fi

# The first deb line of apt's sources (one-line or deb822 format), else Debian's own.
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true) | grep -E '^(deb |URIs:)' \
    | grep -v -- '-security' | sed -E 's/^deb (\[[^]]*\] )?//; s/^URIs: *//' \
    | awk 'NR == 1 {print $1}' || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE from $mirror"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$mirror" >/dev/null
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
SOURCES
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "$IMAGE made"
