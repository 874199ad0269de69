#!/usr/bin/env bash
# The analysis of the example manifests in examples/, without any agent or
# kernel (scripts/demo.sh runs it last; it also runs on its own, as any user):
# validate, lint, coverage, matrix, explain and diff, each under a heading.
# lint, diff and explain exit 1 to report findings (a warning, a difference, a
# denied connection); that is expected here, so only an exit status of 2 or more
# (bad input, a crash) stops the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STOCKADE=${STOCKADE:-.venv/bin/stockade}
EX=examples
V1=(-f "$EX/cluster.yaml" "$EX/policies.yaml")
V2=(-f "$EX/cluster.yaml" "$EX/policies-v2.yaml")

heading() {
  printf '\n=== %s\n' "$*"
}

# Runs `stockade ARGS…`, echoing it; exit 1 means "findings" and is reported, not fatal.
run() {
  local rc=0
  printf '$ stockade %s\n' "$*"
  "$STOCKADE" "$@" || rc=$?
  if ((rc > 1)); then
    echo "analysis: 'stockade $*' failed (exit $rc)" >&2
    exit "$rc"
  fi
  if ((rc == 1)); then
    echo "(exit 1: findings)"
  fi
}

heading "Validate the policies as the API server would"
run validate "$EX/policies.yaml" "$EX/policies-v2.yaml"

heading "Lint version 1 (notes only) and version 2 (an AND/OR peer mistake)"
run lint "${V1[@]}"
echo
run lint "${V2[@]}"

heading "Coverage of version 1: what is left open, what never takes effect"
run coverage "${V1[@]}"

heading "Reachability matrix of version 1 (API port 8000, PostgreSQL 5432, DNS)"
run matrix "${V1[@]}" --port 8000 --port 5432
echo
run matrix "${V1[@]}" --port 53 --protocol UDP

heading "Explain one allowed and one denied connection"
run explain "${V1[@]}" --from frontend/web --to backend/api --port api
echo
run explain "${V1[@]}" --from frontend/admin --to backend/api --port api

heading "Diff: what version 2 opens and closes, for review before applying"
run diff "${V1[@]}" --against "$EX/policies-v2.yaml"

heading "The administrator's tiers: ClusterNetworkPolicies over version 1"
run explain "${V1[@]}" "$EX/cluster-policies.yaml" --from frontend/web --to backend/api --port api
echo
run explain "${V1[@]}" "$EX/cluster-policies.yaml" --from monitoring/prometheus --to backend/api --port 9090

echo
echo "analysis: done"
