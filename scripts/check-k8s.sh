#!/usr/bin/env bash
# Checks k8s/ offline, as a cluster's API server would before anything runs:
#   - every overlay (and the base) renders with `kubectl kustomize`;
#   - core objects validate strictly (unknown fields refused) against Kubernetes'
#     schemas with kubernetes-validate; KEDA's and the Prometheus Operator's objects
#     against the schemas in k8s/schemas/ with check-jsonschema;
#   - the alert rules, and every query of the Grafana dashboard, pass promtool;
#   - the probes point at /healthz and /readyz on the metrics port;
#   - yamllint passes on k8s/;
#   - and each check fails on a manifest broken on purpose (a check that cannot fail
#     proves nothing).
# Python tools live in a venv of their own ($HAUL_K8S_VENV, default target/k8s-venv);
# promtool comes from Debian's prometheus package (installed if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'check-k8s: %s\n' "$*" >&2; }
fail() { log "$*"; exit 1; }

VENV="${HAUL_K8S_VENV:-$PWD/target/k8s-venv}"
if ! "$VENV/bin/python" -c "import kubernetes_validate, check_jsonschema, yamllint, yaml" 2>/dev/null; then
  log "installing kubernetes-validate, check-jsonschema and yamllint into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0
fi
if ! command -v promtool >/dev/null; then
  SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  log "installing promtool (Debian's prometheus package)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if command -v kubectl >/dev/null; then
  render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null; then
  render() { kustomize build "$1"; }
else
  fail "neither kubectl nor kustomize is installed: install kubectl (https://kubernetes.io/docs/tasks/tools/) to render k8s/"
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
PY="$VENV/bin/python"

# Splits rendered YAML into core objects (one file) and custom resources (one file per
# object, named after its kind), and pulls out the alert rules and dashboard queries.
split() { # rendered-file out-dir
  "$PY" - "$1" "$2" <<'PYTHON'
import json, sys, yaml
src, out = sys.argv[1], sys.argv[2]
core, n = [], 0
custom = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
rules = []
for doc in yaml.safe_load_all(open(src)):
    if not doc:
        continue
    kind = doc["kind"]
    if kind in custom:
        n += 1
        with open(f"{out}/{kind.lower()}-{n}.json", "w") as f:
            json.dump(doc, f)
        if kind == "PrometheusRule":
            rules.extend(doc["spec"]["groups"])
    else:
        core.append(doc)
    if kind == "ConfigMap" and doc["metadata"]["name"] == "haul-grafana-dashboard":
        # every panel query, as a recording rule, so that promtool parses it
        dash = json.loads(doc["data"]["haul-backfill.json"])
        recs = [{"record": f"haul_dashboard:panel{i}:{t['refId']}", "expr": t["expr"]}
                for i, p in enumerate(dash["panels"]) for t in p["targets"]]
        rules.append({"name": "haul-dashboard-queries", "rules": recs})
    # every probe of a haul role points at its health endpoints on the metrics port
    if kind == "Deployment":
        for c in doc["spec"]["template"]["spec"]["containers"]:
            want = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
            for probe, path in want.items():
                got = c.get(probe, {}).get("httpGet", {})
                if got.get("path") != path or got.get("port") != "metrics":
                    sys.exit(f"{doc['metadata']['name']}: {probe} is {got}, not {path} on port metrics")
yaml.safe_dump_all(core, open(f"{out}/core.yaml", "w"))
if rules:
    yaml.safe_dump({"groups": rules}, open(f"{out}/rules.yaml", "w"))
PYTHON
}

check_rendered() { # rendered-file name
  local dir="$OUT/$2"
  mkdir -p "$dir"
  split "$1" "$dir" || return 1
  "$VENV/bin/kubernetes-validate" --strict --quiet "$dir/core.yaml" || return 1
  local f kind
  for f in "$dir"/*.json; do
    [ -e "$f" ] || continue
    kind=$(basename "$f" .json); kind=${kind%-*}
    "$VENV/bin/check-jsonschema" -q --schemafile "k8s/schemas/$kind.json" "$f" || { log "$2: $(basename "$f") fails k8s/schemas/$kind.json"; return 1; }
  done
  if [ -f "$dir/rules.yaml" ]; then
    promtool check rules "$dir/rules.yaml" >/dev/null || { promtool check rules "$dir/rules.yaml" >&2; return 1; }
  fi
}

for k in k8s/base k8s/overlays/dev k8s/overlays/prod; do
  render "$k" >"$OUT/$(basename "$k").yaml" || fail "$k does not render"
  check_rendered "$OUT/$(basename "$k").yaml" "$(basename "$k")" || fail "$k does not validate"
  log "$k renders and validates ($(grep -c '^kind:' "$OUT/$(basename "$k").yaml") objects)"
done
"$VENV/bin/yamllint" -s -c k8s/.yamllint k8s/ || fail "yamllint found problems in k8s/"

# each check must catch a manifest broken on purpose
broken() { # name sed-expression
  sed -e "$2" "$OUT/dev.yaml" >"$OUT/broken-$1.yaml"
  if check_rendered "$OUT/broken-$1.yaml" "broken-$1" 2>/dev/null >/dev/null; then
    fail "the checks passed a manifest with $1"
  fi
}
broken "an unknown Deployment field" 's/^  replicas: 1$/  replica: 1/'
broken "a misspelt ScaledObject field" 's/pollingInterval:/pollInterval:/'
broken "an unknown rabbitmq trigger mode" 's/mode: QueueLength/mode: Length/'
broken "a bad alert expression" 's/> 6 \* 3600/> > 6/'
broken "a probe off its health endpoint" 's#path: /readyz#path: /ready#'
log "each check refuses a manifest broken on purpose"
