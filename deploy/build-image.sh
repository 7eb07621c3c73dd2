#!/usr/bin/env bash
# Build nubis's image (deploy/Dockerfile) as ${NUBIS_IMAGE:-nubis:latest}.
# BASE (default nubis-base:bookworm, made by make-base-image.sh when missing) is the
# Debian bookworm image to build on, e.g. BASE=python:3.11-slim-bookworm with a registry.
# The build machine's extra CAs (/usr/local/share/ca-certificates) are handed to the build
# stage, for a package index reached through a TLS-inspecting proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE:-nubis-base:bookworm}"
if [ "$BASE" = nubis-base:bookworm ]; then
  bash deploy/make-base-image.sh
fi
find deploy/ca -name '*.crt' -delete
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] && cp "$crt" deploy/ca/
done
docker build --network host --build-arg BASE="$BASE" -f deploy/Dockerfile \
  -t "${NUBIS_IMAGE:-nubis:latest}" .
