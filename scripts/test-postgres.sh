#!/usr/bin/env bash
# The extra Postgres servers the test suite needs beside the main one (scripts/services.sh):
#   - a production-like server on localhost:5442 that accepts TCP connections only over
#     TLS, with SCRAM-SHA-256 passwords (or, for role haul_cert, a client certificate),
#     its certificates signed by a CA of its own; administered over its Unix socket.
# Files live in $HAUL_PGTLS_DIR (default /var/tmp/haul-pgtls): ca.pem (the CA),
# other-ca.pem (a CA that signed nothing here), client.crt/client.key (CN=haul_cert).
# Idempotent: a server already up is left as it is.
set -euo pipefail

log() { printf 'test-postgres: %s\n' "$*" >&2; }

DIR="${HAUL_PGTLS_DIR:-/var/tmp/haul-pgtls}"
PORT="${HAUL_PGTLS_PORT:-5442}"
BIN="/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -n1)/bin"

# initdb and the server refuse to run as root: they run as `postgres` then
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

up() { "$BIN/pg_isready" -q -h "$DIR" -p "$PORT" 2>/dev/null; }

certs() {
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  local tmp; tmp=$(mktemp -d)
  openssl req -x509 -days 3650 -subj /CN=haul-test-pg-ca "${ec[@]}" -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
  openssl req -x509 -days 3650 -subj /CN=haul-unrelated-ca "${ec[@]}" -keyout "$tmp/other-ca.key" -out "$tmp/other-ca.pem" 2>/dev/null
  sign() { # name subject extensions
    openssl req -subj "$2" "${ec[@]}" -keyout "$tmp/$1.key" -out "$tmp/$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$tmp/$1.ext"
    openssl x509 -req -days 3650 -in "$tmp/$1.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
      -CAcreateserial -extfile "$tmp/$1.ext" -out "$tmp/$1.crt" 2>/dev/null
  }
  # the server's name is localhost only: connecting as 127.0.0.1 fails verify-full
  sign server /CN=localhost $'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth'
  sign client /CN=haul_cert $'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth'
  cp "$tmp"/{ca.pem,other-ca.pem,server.crt,server.key,client.crt,client.key} "$DIR/"
  chmod 600 "$DIR/client.key" "$DIR/server.key"
  rm -rf "$tmp"
}

if up; then exit 0; fi
command -v openssl >/dev/null || { log "openssl is needed"; exit 1; }
mkdir -p "$DIR"
[ -f "$DIR/ca.pem" ] || { log "making a CA and certificates in $DIR"; certs; }
if [ "$(id -u)" = 0 ]; then chown -R postgres: "$DIR"; fi
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  log "creating the TLS-only server in $DIR/data"
  as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=reject >/dev/null
  as_pg cp "$DIR/server.crt" "$DIR/server.key" "$DIR/ca.pem" "$DIR/data/"
  as_pg chmod 600 "$DIR/data/server.key"
  as_pg tee "$DIR/data/pg_hba.conf" >/dev/null <<'EOF'
local   all  all                     trust
hostssl all  haul_cert  127.0.0.1/32 cert
hostssl all  haul_cert  ::1/128      cert
hostssl all  all        127.0.0.1/32 scram-sha-256
hostssl all  all        ::1/128      scram-sha-256
EOF
  as_pg tee -a "$DIR/data/postgresql.conf" >/dev/null <<EOF
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
EOF
fi
log "starting the TLS-only server on localhost:$PORT"
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start >/dev/null
up || { log "the TLS-only server did not come up; see $DIR/server.log"; exit 1; }
as_pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -XqtAc \
  "SELECT 1 FROM pg_roles WHERE rolname = 'haul_cert'" | grep -q 1 \
  || as_pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -Xqc "CREATE ROLE haul_cert LOGIN SUPERUSER"
