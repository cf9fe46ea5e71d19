#!/usr/bin/env bash
# Builds the container image from the Dockerfile with buildah (Debian's package,
# installed if missing; no daemon, runs as root in a plain VM), tags it localhost/haul:dev,
# and checks it: it runs as a non-root user, `haul --version` names this revision, and
# `haul run` in it extracts a table from the local Postgres exactly.
#
# Base images cannot be pulled on a machine without a registry, so by default the two
# bases the Dockerfile names are made locally once, and kept:
#   - localhost/haul-build-base:bookworm: Debian bookworm (debootstrap) with gcc and
#     this machine's Rust toolchain, in the layout of the official rust image;
#   - localhost/haul-runtime-base:bookworm: what distroless/cc-debian12:nonroot holds
#     (glibc, libgcc, CA certificates, user 65532), taken from this Debian 12 machine.
# Both carry this machine's CA bundle (what it trusts, a TLS-inspecting proxy's CA
# included): images to ship are built on the Dockerfile's own bases.
# With registry access, HAUL_IMAGE_PULL=1 builds on the Dockerfile's own bases.
#
# Usage: scripts/build-image.sh [tag]      (default localhost/haul:dev)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG="${1:-localhost/haul:dev}"
BUILD_BASE=localhost/haul-build-base:bookworm
RUNTIME_BASE=localhost/haul-runtime-base:bookworm
log() { printf 'build-image: %s\n' "$*" >&2; }
SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
apt_install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v buildah >/dev/null || { log "installing buildah"; apt_install buildah; }
# vfs storage and chroot isolation: no kernel overlay or user namespaces needed
B() { $SUDO buildah --storage-driver vfs "$@"; }
have() { B inspect --type image "$1" >/dev/null 2>&1; }

make_runtime_base() {
  log "making $RUNTIME_BASE from this machine's glibc, libgcc and CA certificates"
  local c root; c=$(B from scratch); root=$(mktemp -d)
  mkdir -p "$root"/{etc/ssl/certs,lib/x86_64-linux-gnu,lib64,tmp,home/nonroot}
  chmod 1777 "$root/tmp"
  local lib
  for lib in libc.so.6 libm.so.6 libgcc_s.so.1 ld-linux-x86-64.so.2; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$root/lib/x86_64-linux-gnu/$lib"
  done
  ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  chown 65532:65532 "$root/home/nonroot"
  B copy "$c" "$root" / >/dev/null
  B config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$c"
  B commit -q "$c" "$RUNTIME_BASE" >/dev/null
  B rm "$c" >/dev/null
  rm -rf "$root"
}

make_build_base() {
  log "making $BUILD_BASE (debootstrap bookworm + gcc + this machine's Rust toolchain)"
  command -v debootstrap >/dev/null || apt_install debootstrap
  local root toolchain; root=$(mktemp -d)
  $SUDO debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
  toolchain="$(rustc --print sysroot)"
  mkdir -p "$root/usr/local/rustup/toolchain" "$root/usr/local/cargo/bin"
  # the compiler and standard library, not the documentation
  cp -a "$toolchain/bin" "$toolchain/lib" "$root/usr/local/rustup/toolchain/"
  local t
  for t in cargo rustc rustdoc; do
    ln -s "/usr/local/rustup/toolchain/bin/$t" "$root/usr/local/cargo/bin/$t"
  done
  # this machine's CA bundle: where egress goes through a TLS-inspecting proxy, cargo
  # reaches crates.io only trusting that proxy's CA as the machine does
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb
  local c; c=$(B from scratch)
  B copy "$c" "$root" / >/dev/null
  B config --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  B commit -q "$c" "$BUILD_BASE" >/dev/null
  B rm "$c" >/dev/null
  $SUDO rm -rf "$root"
}

REV=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
ARGS=(--build-arg "HAUL_GIT_REV=$REV")
if [ "${HAUL_IMAGE_PULL:-0}" != 1 ]; then
  have "$RUNTIME_BASE" || make_runtime_base
  have "$BUILD_BASE" || make_build_base
  ARGS+=(--build-arg "RUST_IMAGE=$BUILD_BASE" --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" --pull-never)
fi
log "building $TAG (revision $REV)"
B bud -q --isolation chroot --layers=false "${ARGS[@]}" -t "$TAG" . >/dev/null
# vfs keeps whole copies: drop the image this build replaced and the build stage
B rmi --prune >/dev/null 2>&1 || true

# what the image is: non-root, entrypoint haul
user=$(B inspect --type image --format '{{.OCIv1.Config.User}}' "$TAG")
[ "$user" = "65532:65532" ] || { log "the image runs as '$user', not 65532:65532"; exit 1; }
size=$(B images --format '{{.Size}}' "$TAG" | head -n1)

# what it does: run its haul, as its user, on the host's network
run() { # [buildah run options] -- haul arguments
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  local c rc=0; c=$(B from -q --pull-never "$TAG")
  # by name, as `kubectl exec <pod> -- haul ...` runs it
  B run --isolation chroot --network host --user 65532:65532 "${opts[@]}" "$c" -- \
    haul "$@" || rc=$?
  B rm "$c" >/dev/null
  return $rc
}
version=$(run -- --version)
case "$version" in *"$REV"*) ;; *) log "haul --version in the image says '$version', not revision $REV"; exit 1 ;; esac

# an end-to-end extract inside the image, read back outside it: count and sum of ids
db="haul_image_$$"
lake=$(mktemp -d)
chmod 777 "$lake"
pg() { psql -X -q -t -A -h 127.0.0.1 -U postgres "$@"; }
cleanup() {
  pg -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$lake"
}
trap cleanup EXIT
pg -d postgres -c "CREATE DATABASE $db"
pg -d "$db" -c "CREATE TABLE t AS SELECT g::bigint AS id, md5(g::text) AS note FROM generate_series(1, 20000) g"
want=$(pg -d "$db" -c "SELECT count(*) || ' ' || sum(id) FROM t")
run -v "$lake:/lake" -- run --source "postgresql://postgres@127.0.0.1:5432/$db" \
  --table public.t --dest /lake >/dev/null
# read back by pyarrow, from the test suite's venv (scripts/test.sh makes it)
py="${HAUL_TEST_PYTHON:-$PWD/target/pyenv/bin/python}"
"$py" -c "import pyarrow" 2>/dev/null \
  || { log "no pyarrow in $py to read the image's output back: run scripts/test.sh once, or set HAUL_TEST_PYTHON"; exit 1; }
got=$("$py" - "$lake/t" <<'PYTHON'
import sys, pyarrow.dataset as ds, pyarrow.compute as pc
t = ds.dataset(sys.argv[1], format="parquet").to_table(columns=["id"])
print(t.num_rows, pc.sum(t["id"]).as_py())
PYTHON
)
[ "$got" = "$want" ] || { log "haul run in the image wrote (count sum) $got, the table holds $want"; exit 1; }
log "$TAG: user 65532, $size, '$version'; haul run in it extracted $got (count, sum of ids) = the table's"
