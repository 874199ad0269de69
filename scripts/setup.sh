#!/usr/bin/env bash
# Installs what stockade needs on a fresh Debian machine: the kernel tools
# (nftables and its library, conntrack, iproute2, probes' helpers; etcd, which the
# tests of the etcd datastore start on loopback themselves) and a
# virtual environment with the package and its development tools.
set -euo pipefail
venv=${1:-.venv}
debs=(nftables libnftables1 iptables ipset conntrack iproute2 lksctp-tools
      containernetworking-plugins podman runc busybox-static
      clang llvm libbpf-dev bpftool gcc libc6-dev iperf3
      etcd-server etcd-client graphviz zsh fish)

missing=()
for d in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# kubectl drives the Kubernetes API test double in tests/integration/test_kubeapi_double.py.
# Only when absent: Debian's kubernetes-client conflicts with a kubectl installed otherwise.
if ! command -v kubectl >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: kubectl is missing (apt-get install kubernetes-client, as root); its tests will be skipped" >&2
  else
    echo "setup: installing kubernetes-client (kubectl)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
  fi
fi

python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# The agent and kube extras too: the tests cover the kernel and the cluster side.
"$venv/bin/pip" install -q -e ".[dev,all]"
# The CNI plugin is one process per container: byte-compile here once instead of on
# every start (an editable install writes no .pyc files, and with
# PYTHONDONTWRITEBYTECODE nothing writes them at run time either).
"$venv/bin/python" -m compileall -q src >/dev/null
