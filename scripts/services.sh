#!/usr/bin/env bash
# Starts (installing on a fresh Debian machine if missing) the services haul's tests and
# demo use: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`). Idempotent.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

apt_install() {
  log "installing $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql postgresql-client; fi
  if ! pg_up; then
    local ver
    ver=$(ls /etc/postgresql | sort -V | tail -n1)
    log "starting PostgreSQL $ver"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  fi
  pg_up || { log "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
  # the demo and tests use database `test`
  if ! psql -h 127.0.0.1 -U postgres -d postgres -XtAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -Xqc "CREATE DATABASE test"
  fi
}

ensure_postgres
log "ready"
