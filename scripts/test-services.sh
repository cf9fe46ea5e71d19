#!/usr/bin/env bash
# The services the test suite needs beside scripts/services.sh's, all with certificates
# from a CA of their own:
#   - a production-like Postgres on localhost:5442 that accepts TCP connections only over
#     TLS, with SCRAM-SHA-256 passwords (or, for role haul_cert, a client certificate);
#     its certificate names localhost only; administered over its Unix socket;
#   - a TLS listener on the local RabbitMQ (127.0.0.1:5671, amqps://; the broker is
#     restarted once to add it), queue statistics every second, and its management API
#     (127.0.0.1:15672, what KEDA's rabbitmq scaler reads); a TLS-only Redis on
#     127.0.0.1:6380 (rediss://);
#   - a hot standby of the main Postgres (streaming replication, pg_basebackup -R) on
#     127.0.0.1:5433 (trust auth, like the main one);
#   - PgBouncer in transaction pooling mode in front of the main Postgres, on
#     127.0.0.1:6432 (Debian's package, installed if missing).
# Files live in $HAUL_TLS_DIR (default /var/tmp/haul-tls): ca.pem (the CA),
# other-ca.pem (a CA that signed nothing here), client.crt/client.key (CN=haul_cert).
# Idempotent: what is already up is left as it is.
set -euo pipefail

log() { printf 'test-services: %s\n' "$*" >&2; }

DIR="${HAUL_TLS_DIR:-/var/tmp/haul-tls}"
PORT="${HAUL_PGTLS_PORT:-5442}"
BIN="/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -n1)/bin"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# initdb and the server refuse to run as root: they run as `postgres` then
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

certs() {
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  local tmp; tmp=$(mktemp -d)
  openssl req -x509 -days 3650 -subj /CN=haul-test-ca "${ec[@]}" -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
  openssl req -x509 -days 3650 -subj /CN=haul-unrelated-ca "${ec[@]}" -keyout "$tmp/other-ca.key" -out "$tmp/other-ca.pem" 2>/dev/null
  sign() { # name subject extensions
    openssl req -subj "$2" "${ec[@]}" -keyout "$tmp/$1.key" -out "$tmp/$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$tmp/$1.ext"
    openssl x509 -req -days 3650 -in "$tmp/$1.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
      -CAcreateserial -extfile "$tmp/$1.ext" -out "$tmp/$1.crt" 2>/dev/null
  }
  # Postgres's names localhost only: connecting as 127.0.0.1 fails verify-full
  sign server /CN=localhost $'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth'
  sign client /CN=haul_cert $'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth'
  # the broker's and Redis's, for 127.0.0.1 as well
  sign links /CN=localhost $'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth'
  cp "$tmp"/{ca.pem,other-ca.pem,server.crt,server.key,client.crt,client.key,links.crt,links.key} "$DIR/"
  chmod 600 "$DIR/client.key" "$DIR/server.key" "$DIR/links.key"
  # the broker runs as its own user
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then chown rabbitmq: "$DIR/links.key"; fi
  rm -rf "$tmp"
}

pg_up() { "$BIN/pg_isready" -q -h "$DIR" -p "$PORT" 2>/dev/null; }

ensure_postgres() {
  pg_up && return
  # the server runs as postgres: its socket folder and the files it copies
  if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR" "$DIR/server.crt" "$DIR/server.key" "$DIR/ca.pem"; fi
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    log "creating the TLS-only Postgres in $DIR/data"
    as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=reject >/dev/null
    as_pg cp "$DIR/server.crt" "$DIR/server.key" "$DIR/ca.pem" "$DIR/data/"
    as_pg chmod 600 "$DIR/data/server.key"
    as_pg tee "$DIR/data/pg_hba.conf" >/dev/null <<'HBA'
local   all  all                     trust
hostssl all  haul_cert  127.0.0.1/32 cert
hostssl all  haul_cert  ::1/128      cert
hostssl all  all        127.0.0.1/32 scram-sha-256
hostssl all  all        ::1/128      scram-sha-256
HBA
    as_pg tee -a "$DIR/data/postgresql.conf" >/dev/null <<CONF
listen_addresses = 'localhost'
port = $PORT
unix_socket_directories = '$DIR'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.pem'
password_encryption = 'scram-sha-256'
max_connections = 60
shared_buffers = 32MB
fsync = off
CONF
  fi
  log "starting the TLS-only Postgres on localhost:$PORT"
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 start >/dev/null
  pg_up || { log "the TLS-only Postgres did not come up; see $DIR/postgres.log"; exit 1; }
  as_pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -XqtAc \
    "SELECT 1 FROM pg_roles WHERE rolname = 'haul_cert'" | grep -q 1 \
    || as_pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -Xqc "CREATE ROLE haul_cert LOGIN SUPERUSER"
}

amqps_up() { (exec 3<>/dev/tcp/127.0.0.1/5671) 2>/dev/null; }

mgmt_up() { curl -fs -u guest:guest -o /dev/null http://127.0.0.1:15672/api/overview 2>/dev/null; }

ensure_rabbitmq() {
  local conf=/etc/rabbitmq/rabbitmq.conf restart=""
  if ! grep -q '^listeners.ssl' "$conf" 2>/dev/null; then
    log "adding a TLS listener (127.0.0.1:5671) to $conf"
    $SUDO tee -a "$conf" >/dev/null <<CONF
listeners.ssl.local = 127.0.0.1:5671
ssl_options.cacertfile = $DIR/ca.pem
ssl_options.certfile = $DIR/links.crt
ssl_options.keyfile = $DIR/links.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
CONF
    restart=1
  fi
  # queue statistics every second (default 5 s): the autoscaling tests read queue depth
  # through the management API, as KEDA's rabbitmq scaler does
  if ! grep -q '^collect_statistics_interval' "$conf" 2>/dev/null; then
    log "setting collect_statistics_interval = 1000 in $conf"
    echo 'collect_statistics_interval = 1000' | $SUDO tee -a "$conf" >/dev/null
    restart=1
  fi
  if [ -n "$restart" ] || ! amqps_up; then
    log "restarting RabbitMQ for its configuration"
    $SUDO rabbitmqctl -q stop >/dev/null 2>&1 || true
    $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 120); do amqps_up && break; sleep 0.5; done
    $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    amqps_up || { log "RabbitMQ has no TLS listener on 127.0.0.1:5671"; exit 1; }
  fi
  # the HTTP management API on 127.0.0.1:15672 (what KEDA's scaler polls), enabled online
  if ! mgmt_up; then
    log "enabling RabbitMQ's management plugin (127.0.0.1:15672)"
    $SUDO rabbitmq-plugins enable -q rabbitmq_management >/dev/null
    for _ in $(seq 1 60); do mgmt_up && break; sleep 0.5; done
    mgmt_up || { log "RabbitMQ's management API does not answer on 127.0.0.1:15672"; exit 1; }
  fi
}

rediss_up() { redis-cli --tls --cacert "$DIR/ca.pem" -h 127.0.0.1 -p 6380 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  rediss_up && return
  log "starting a TLS-only Redis on 127.0.0.1:6380"
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port 6380 \
    --tls-cert-file "$DIR/links.crt" --tls-key-file "$DIR/links.key" --tls-ca-cert-file "$DIR/ca.pem" \
    --tls-auth-clients optional --save "" --appendonly no
  for _ in $(seq 1 40); do rediss_up && return; sleep 0.25; done
  log "the TLS Redis did not come up on 127.0.0.1:6380"; exit 1
}

STANDBY_PORT="${HAUL_STANDBY_PORT:-5433}"
standby_up() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$STANDBY_PORT" 2>/dev/null; }
primary() { psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -XqtAc "$1"; }

streaming() {
  for _ in $(seq 1 40); do
    [ "$(psql -h 127.0.0.1 -p "$STANDBY_PORT" -U postgres -d postgres -XqtAc \
      "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null)" = streaming ] && return 0
    sleep 0.25
  done
  return 1
}

ensure_standby() {
  if standby_up; then
    streaming && return
    # behind for good (the primary recycled the WAL it needs, e.g. after a long stop):
    # made again from a fresh base backup
    log "the standby is not streaming; making it again"
    as_pg "$BIN/pg_ctl" -D "$DIR/standby" -m fast stop >/dev/null || true
    rm -rf "$DIR/standby"
  fi
  if [ ! -f "$DIR/standby/PG_VERSION" ]; then
    local hba; hba=$(primary "SHOW hba_file")
    if ! grep -Eq '^host[[:space:]]+replication' "$hba"; then
      log "allowing replication connections from 127.0.0.1 in $hba"
      echo "host replication all 127.0.0.1/32 trust" | $SUDO tee -a "$hba" >/dev/null
      primary "SELECT pg_reload_conf()" >/dev/null
    fi
    log "making a streaming replica of 127.0.0.1:5432 in $DIR/standby"
    rm -rf "$DIR/standby"
    as_pg "$BIN/pg_basebackup" -h 127.0.0.1 -p 5432 -U postgres -D "$DIR/standby" -R -X stream -c fast
    # Debian keeps a cluster's configuration outside its data folder: the standby's own
    as_pg tee "$DIR/standby/pg_hba.conf" >/dev/null <<'HBA'
local all all trust
host  all all 127.0.0.1/32 trust
HBA
    as_pg touch "$DIR/standby/pg_ident.conf"
    as_pg tee "$DIR/standby/postgresql.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
port = $STANDBY_PORT
unix_socket_directories = '$DIR'
max_connections = $(primary "SHOW max_connections")
max_worker_processes = $(primary "SHOW max_worker_processes")
max_wal_senders = $(primary "SHOW max_wal_senders")
max_locks_per_transaction = $(primary "SHOW max_locks_per_transaction")
max_prepared_transactions = $(primary "SHOW max_prepared_transactions")
shared_buffers = 32MB
hot_standby = on
hot_standby_feedback = on
max_standby_streaming_delay = 30s
CONF
  fi
  log "starting the standby on 127.0.0.1:$STANDBY_PORT"
  as_pg "$BIN/pg_ctl" -D "$DIR/standby" -l "$DIR/standby.log" -w -t 120 start >/dev/null
  standby_up || { log "the standby did not come up; see $DIR/standby.log"; exit 1; }
  streaming || { log "the standby does not stream from the primary; see $DIR/standby.log"; exit 1; }
}

pgbouncer_up() { (exec 3<>/dev/tcp/127.0.0.1/6432) 2>/dev/null; }

ensure_pgbouncer() {
  pgbouncer_up && return
  if ! command -v pgbouncer >/dev/null; then
    log "installing pgbouncer"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  fi
  local conf="$DIR/pgbouncer"
  as_pg mkdir -p "$conf"
  as_pg tee "$conf/pgbouncer.ini" >/dev/null <<CONF
[databases]
* = host=127.0.0.1 port=5432
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
unix_socket_dir =
auth_type = trust
auth_file = $conf/users.txt
pool_mode = transaction
ignore_startup_parameters = extra_float_digits
logfile = $conf/pgbouncer.log
pidfile = $conf/pgbouncer.pid
CONF
  echo '"postgres" ""' | as_pg tee "$conf/users.txt" >/dev/null
  log "starting PgBouncer (transaction pooling) on 127.0.0.1:6432"
  as_pg pgbouncer -d "$conf/pgbouncer.ini"
  for _ in $(seq 1 40); do pgbouncer_up && return; sleep 0.25; done
  log "PgBouncer did not come up; see $conf/pgbouncer.log"; exit 1
}

command -v openssl >/dev/null || { log "openssl is needed"; exit 1; }
mkdir -p "$DIR"
[ -f "$DIR/links.crt" ] || { log "making a CA and certificates in $DIR"; certs; }
ensure_postgres
ensure_rabbitmq
ensure_redis
ensure_standby
ensure_pgbouncer
