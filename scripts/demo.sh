#!/usr/bin/env bash
# The main job (make demo): a live node agent enforcing NetworkPolicies on
# containers, checked with real packets; then the analysis of examples/.
#
#  1. starts `stockade agent` in the background inside a private network
#     namespace (stkdemo-ID), with a temporary state directory and socket;
#  2. starts three containers with `stockade run` (frontend/web, backend/api,
#     db/postgres), each serving a real TCP port (examples/agent/server.py);
#  3. prints the model's matrix beside the one measured with real packets
#     (`stockade probe`), before and after applying examples/agent/policies.yaml;
#  4. shows that a container's policy is in force before its command starts,
#     and that its endpoint goes away when the command exits;
#  5. tears everything down, then runs scripts/analysis-demo.sh.
#
# Needs root (namespaces, veth, nftables). Exits non-zero if the model and the
# kernel disagree on any pair. Safe to run again and in parallel: every run has
# its own names, holds a lock while it lives, and cleans up what an interrupted
# earlier run left behind. STOCKADE_DEMO_LIVE=0 runs only the analysis.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STOCKADE=${STOCKADE:-.venv/bin/stockade}
PY=${PYTHON:-$(dirname "$STOCKADE")/python}
[ -x "$PY" ] || PY=python3
RUNDIR=/run/stockade-demo
EX=examples/agent

heading() {
  printf '\n=== %s\n' "$*"
}

# Runs `stockade ARGS…`, echoing it; any failure ends the demo (the trap cleans up).
live() {
  printf '$ stockade %s\n' "$*"
  "$STOCKADE" "$@"
}

# Removes what run ID made: processes in its endpoint namespaces, the
# namespaces (the agent's with its bridge and table), its directory and lock.
clean_run() {
  local id=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^d${id}[0-9a-f]{8}n$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns delete "$ns" 2>/dev/null || true
  done
  ip netns delete "stkdemo-$id" 2>/dev/null || true
  rm -rf "${RUNDIR:?}/$id" "$RUNDIR/$id.lock"
}

# Earlier runs whose lock nobody holds any more were interrupted: clean them up.
sweep() {
  local lock id
  for lock in "$RUNDIR"/*.lock; do
    [ -e "$lock" ] || continue
    id=$(basename "$lock" .lock)
    if flock -n "$lock" true; then
      echo "demo: cleaning up after an interrupted run ($id)"
      clean_run "$id"
    fi
  done
}

stop_agent() {
  [ -n "${AGENT_PID:-}" ] || return 0
  if kill -0 "$AGENT_PID" 2>/dev/null; then
    local keys
    keys=$("$STOCKADE" ps -q 2>/dev/null || true)
    # shellcheck disable=SC2086 # one argument per container
    [ -z "$keys" ] || "$STOCKADE" rm --grace 2 $keys >/dev/null 2>&1 || true
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$AGENT_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$AGENT_PID" 2>/dev/null || true
  fi
  wait "$AGENT_PID" 2>/dev/null || true
  AGENT_PID=
}

teardown() {
  set +e
  stop_agent
  if [ -n "${ID:-}" ]; then
    [ -z "${LOCK_FD:-}" ] || exec {LOCK_FD}>&-
    clean_run "$ID"
    ID=
  fi
  set -e
}

on_exit() {
  local rc=$?
  trap - EXIT
  if ((rc != 0)) && [ -n "${ID:-}" ] && [ -f "$RUNDIR/$ID/agent.log" ]; then
    echo "demo: failed (exit $rc); the agent's last words:" >&2
    tail -n 20 "$RUNDIR/$ID/agent.log" >&2
  fi
  teardown
  exit "$rc"
}

wait_ready() {
  for _ in $(seq 150); do
    "$STOCKADE" status >/dev/null 2>&1 && return 0
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
      echo "demo: the agent exited during start-up" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "demo: the agent did not get ready in 30 s" >&2
  return 1
}

# The model's matrix beside the measured one; a disagreement fails the demo.
probe() {
  if ! live probe; then
    echo "demo: the model and the kernel DISAGREE (see above)" >&2
    exit 1
  fi
}

# The address of endpoint NS/NAME, from `stockade get endpoints -o json`.
address_of() {
  "$STOCKADE" get endpoints -o json | "$PY" -c '
import json, sys
ns, name = sys.argv[1].split("/")
print(next(e["ips"][0] for e in json.load(sys.stdin)
           if (e["namespace"], e["name"]) == (ns, name)))' "$1"
}

wait_gone() {
  for _ in $(seq 100); do
    "$STOCKADE" ps -q | grep -qx "$1" || return 0
    sleep 0.1
  done
  echo "demo: $1 is still there 10 s after its command exited" >&2
  return 1
}

start_agent() {
  for tool in ip flock; do
    command -v "$tool" >/dev/null || { echo "demo: $tool is missing (run make setup)" >&2; exit 1; }
  done
  if ! "$STOCKADE" run --help >/dev/null 2>&1; then
    echo "demo: $STOCKADE has no 'run' command (is cli/containers.py registered?)" >&2
    exit 1
  fi
  [ -d /proc/sys/net/bridge ] || modprobe br_netfilter 2>/dev/null || true
  mkdir -p "$RUNDIR"
  sweep
  ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  ID=${ID:0:5}
  NETNS=stkdemo-$ID
  DIR=$RUNDIR/$ID
  mkdir -p "$DIR"
  exec {LOCK_FD}>"$RUNDIR/$ID.lock"
  flock -n "$LOCK_FD"
  export STOCKADE_SOCKET=$DIR/agent.sock

  heading "Start the agent in a private network namespace"
  echo "\$ ip netns add $NETNS"
  ip netns add "$NETNS"
  echo "\$ stockade agent --netns $NETNS --state-dir $DIR/state --bridge-prefix d$ID &"
  "$STOCKADE" agent --netns "$NETNS" --state-dir "$DIR/state" --socket "$STOCKADE_SOCKET" \
    --bridge-prefix "d$ID" >"$DIR/agent.log" 2>&1 &
  AGENT_PID=$!
  wait_ready
  live status
}

live_demo() {
  start_agent

  heading "Three containers on the agent's bridge, each serving a real TCP port"
  live apply -f "$EX/namespaces.yaml"
  live run -n frontend --name web -l app=web --port http=8080/tcp -- \
    "$PY" "$EX/server.py" 8080
  live run -n backend --name api -l app=api --port api=8000/tcp -- \
    "$PY" "$EX/server.py" 8000
  live run -n db --name postgres -l app=postgres --port postgres=5432/tcp -- \
    "$PY" "$EX/server.py" 5432
  live ps
  echo
  live get endpoints

  heading "No policy yet: the model allows every pair, and so does the kernel"
  probe

  heading "Default deny in backend and db; frontend -> api (port api), api -> postgres"
  live apply -f "$EX/policies.yaml"
  live status

  heading "The model's matrix beside the one measured with real packets"
  probe

  heading "Policy before process: a container in db (egress denied) connects at once"
  local web log
  web=$(address_of frontend/web)
  log=$DIR/state/containers/db_early.log
  live run -n db --name early -- "$PY" "$EX/connect.py" "$web" 8080 1
  wait_gone db/early
  live ps --all
  echo "\$ cat $log"
  cat "$log"
  if ! grep -q "no connection" "$log"; then
    echo "demo: the first packet of db/early got through: policy was not in force" >&2
    exit 1
  fi

  heading "Denied flows the kernel logged"
  live flows --limit 5 || echo "(the denied-flow log is not available from this agent)"

  heading "Remove the containers; stop the agent; delete the namespace"
  live rm frontend/web backend/api db/postgres
  live get endpoints
  teardown
  echo "(agent stopped, $NETNS and every endpoint namespace deleted)"
}

trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${STOCKADE_DEMO_LIVE:-1}" != 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "demo: the live part needs root (network namespaces, veth, nftables);" \
      "run it as root, or with STOCKADE_DEMO_LIVE=0 for the analysis only" >&2
    exit 1
  fi
  live_demo
fi

heading "Analysis of the example manifests (scripts/analysis-demo.sh)"
STOCKADE=$STOCKADE bash scripts/analysis-demo.sh

echo
echo "demo: done"
