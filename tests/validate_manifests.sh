#!/usr/bin/env bash
# Validates the Kubernetes manifests in config/ (config/kubernetes.example.yaml
# is src/render.rs's output, kept current by its unit tests) against the
# Kubernetes OpenAPI schemas, strictly (unknown fields are errors), offline:
# kubernetes-validate from PyPI bundles the schemas of each release.
#
# The validator is installed in a venv under target/ on first use (PyPI only).
# KUBE_VERSIONS picks the releases to check (default: the kubectl the tests
# pin, and the newest the validator knows).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSIONS="${KUBE_VERSIONS:-1.32.0 1.37.0}"
VALIDATOR_VERSION="1.37.0"
venv="${CARGO_TARGET_DIR:-target}/manifest-venv"
kv="$venv/bin/kubernetes-validate"

if [[ ! -x "$kv" ]] || [[ "$("$kv" --version 2>/dev/null)" != *"$VALIDATOR_VERSION"* ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$VALIDATOR_VERSION"
fi

manifests=(config/*.yaml)
((${#manifests[@]})) || {
    echo "validate_manifests: no manifests in config/" >&2
    exit 1
}

# The validator must be able to say no: a Deployment with a misspelt field
# and a wrongly typed one has to fail, or every pass below means nothing.
bad="$(mktemp --suffix=.yaml)"
trap 'rm -f "$bad"' EXIT
cat >"$bad" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, securityContex: {}}]
YAML

passed=0
failed=0
for v in $KUBE_VERSIONS; do
    if "$kv" --quiet --strict -k "$v" "$bad" >/dev/null 2>&1; then
        echo "FAIL the validator accepted a broken manifest for Kubernetes $v" >&2
        failed=$((failed + 1))
    fi
    for m in "${manifests[@]}"; do
        if out="$("$kv" --strict -k "$v" "$m" 2>&1)" && ! grep -q "^WARN\|^ERROR" <<<"$out"; then
            echo "ok   $m: $(grep -c passed <<<"$out") objects valid for Kubernetes $v (strict)"
            passed=$((passed + 1))
        else
            printf 'FAIL %s for Kubernetes %s\n%s\n' "$m" "$v" "$out" >&2
            failed=$((failed + 1))
        fi
    done
done
echo "$passed passed, $failed failed"
((failed == 0))
