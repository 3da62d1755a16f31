#!/usr/bin/env bash
# Load comparison: portico against nginx, HAProxy and Varnish on this
# machine, in one run, loopback only. Installs what it needs from Debian,
# builds portico in release mode, then runs benches/compare.py, which prints
# the table and the ratios to nginx. Takes about 5 minutes.
#   bash benches/compare.sh            # default: 3 rounds x 4 s per run
#   ROUNDS=5 DURATION=10 bash benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nginx haproxy varnishd wrk taskset; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing nginx haproxy varnish wrk (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy varnish wrk util-linux >/dev/null
fi
# Debian's packages start their services; the benchmark runs its own.
for svc in nginx haproxy varnish; do
    (service "$svc" stop || systemctl stop "$svc") >/dev/null 2>&1 || true
done

echo "== building portico (release)"
cargo build --release -q --bin portico
exec python3 benches/compare.py "$@"
