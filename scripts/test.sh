#!/usr/bin/env bash
# The test suite, runnable on a fresh machine: installs the Python side (vmware-nsxlib, the
# client library NCP is built on, and pytest) into .venv, then runs every Rust test, which
# includes the nsxlib suite against the standalone fake.
set -euo pipefail
cd "$(dirname "$0")/.."
# Open vSwitch 3.1 (Debian): the OpenFlow syntax, fake-ovs and the OVS adapter are checked
# against a real ovs-vswitchd; iproute2 makes the pod network namespaces of the node test;
# Chromium renders the HTML report.
missing=()
if ! command -v ovs-vswitchd >/dev/null 2>&1 && [ ! -x /usr/sbin/ovs-vswitchd ]; then
  missing+=(openvswitch-switch)
fi
if ! command -v ip >/dev/null 2>&1 && [ ! -x /usr/sbin/ip ] && [ ! -x /sbin/ip ]; then
  missing+=(iproute2)
fi
# Debian's Chromium, headless: the HTML report is opened in a real browser.
if ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
# A container runtime's CNI library (libcni 1.1, built with Debian's Go) and the reference
# plugins chained after nsx-cni (portmap needs iptables) in the node test.
if ! command -v go >/dev/null 2>&1; then
  missing+=(golang-go)
fi
if [ ! -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ]; then
  missing+=(golang-github-appc-cni-dev)
fi
if [ ! -x /usr/lib/cni/bandwidth ]; then
  missing+=(containernetworking-plugins)
fi
if ! command -v iptables >/dev/null 2>&1 && [ ! -x /usr/sbin/iptables ]; then
  missing+=(iptables)
fi
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check 'vmware-nsxlib==19.4.3' 'pytest>=7'
# The tests run optimized, with this workspace's debug assertions and overflow checks kept (the
# `ci` profile in Cargo.toml): the simulations and property tests run several times faster than
# in the dev profile, for about the same build time. `--profile dev` (or `--release`) overrides.
profile=(--profile ci)
for a in "$@"; do
  case "$a" in --profile|--profile=*|--release|-r) profile=() ;; esac
done
cargo test --workspace "${profile[@]}" "$@"
