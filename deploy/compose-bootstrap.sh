#!/bin/sh
# The one-shot bootstrap of a compose cloud (docker-compose.yml's `bootstrap`): the service
# credential's password and the cloud admin's, each made once in the secrets volume, then
# `nubis-manage bootstrap` (admin project and user, service user, quota defaults) in etcd.
# Run again, it changes nothing.
set -eu
dir="${NUBIS_SECRETS_DIR:-/run/nubis}"
mkdir -p "$dir"
umask 077
make_secret() {
  if [ ! -s "$1" ]; then
    if [ -n "${2:-}" ]; then printf '%s\n' "$2" > "$1.new"
    else python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$1.new"; fi
    mv "$1.new" "$1"
  fi
}
make_secret "$dir/service-password"
make_secret "$dir/admin-password" "${NUBIS_ADMIN_PASSWORD:-}"
# Readable by the services whatever user they run as; the volume is theirs alone.
chmod 0644 "$dir/service-password"
NUBIS_AUTH__ADMIN_PASSWORD="$(cat "$dir/admin-password")" exec nubis-manage bootstrap
