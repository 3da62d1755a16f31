#!/usr/bin/env bash
# End-to-end check with a real Prometheus: order backends, portico and
# Prometheus scraping portico's admin port, all on loopback. Generates
# traffic, then asks Prometheus's HTTP API whether the metrics arrived with
# sane values, and lints the exposition with `promtool check metrics`.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "== installing prometheus (Debian)"
    apt-get update -qq
    apt-get install -y -qq prometheus >/dev/null
fi

cargo build -q --bins
BIN=target/debug
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 30 s) until the URL answers 200.
wait_http() {
    for _ in $(seq 1 150); do
        if curl -fs -o /dev/null "$1"; then return 0; fi
        sleep 0.2
    done
    echo "FAIL: $1 never answered" >&2
    exit 1
}

B1=$(free_port); B2=$(free_port); PROXY=$(free_port); ADMIN=$(free_port); PROM=$(free_port)
"$BIN/order-backend" --listen "127.0.0.1:$B1" --name b1 2>"$WORK/b1.log" & PIDS+=($!)
"$BIN/order-backend" --listen "127.0.0.1:$B2" --name b2 2>"$WORK/b2.log" & PIDS+=($!)

cat >"$WORK/portico.toml" <<TOML
[server]
listen = ["127.0.0.1:$PROXY"]
[admin]
listen = "127.0.0.1:$ADMIN"
[[upstream]]
name = "orders"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2"]
[upstream.health]
interval = "1s"
timeout = "500ms"
[[route]]
path_prefix = "/"
upstream = "orders"
TOML
"$BIN/portico" check --config "$WORK/portico.toml"
"$BIN/portico" --config "$WORK/portico.toml" 2>"$WORK/portico.log" & PIDS+=($!)

cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: portico
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM" 2>"$WORK/prometheus.log" & PIDS+=($!)

wait_http "http://127.0.0.1:$B1/health"
wait_http "http://127.0.0.1:$B2/health"
wait_http "http://127.0.0.1:$ADMIN/readyz"
wait_http "http://127.0.0.1:$PROM/-/ready"

echo "== traffic: 20 GETs through portico"
for _ in $(seq 1 20); do
    curl -fs -o /dev/null "http://127.0.0.1:$PROXY/users/1/orders"
done

echo "== promtool check metrics"
curl -fs "http://127.0.0.1:$ADMIN/metrics" >"$WORK/metrics.txt"
if ! promtool check metrics <"$WORK/metrics.txt" >"$WORK/promtool.txt" 2>&1 || [ -s "$WORK/promtool.txt" ]; then
    echo "FAIL: promtool reported problems:" >&2
    cat "$WORK/promtool.txt" >&2
    exit 1
fi
echo "promtool: no problems"

# Prints the value of a PromQL query once it has a result (30 s at most).
query() {
    for _ in $(seq 1 60); do
        value=$(curl -fs --get "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode "query=$1" |
            python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")')
        if [ -n "$value" ]; then echo "$value"; return 0; fi
        sleep 0.5
    done
    echo "FAIL: Prometheus has no result for $1" >&2
    exit 1
}

check() { # name, query, python condition on v
    local value
    value=$(query "$2")
    if python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if ($3) else 1)" "$value"; then
        echo "ok: $1 = $value"
    else
        echo "FAIL: $1 = $value, expected $3" >&2
        exit 1
    fi
}

echo "== Prometheus API"
check "target up" 'up{job="portico"}' 'v == 1'
check "requests (200, route orders)" 'max_over_time(portico_requests_total{route="orders",code="200"}[1m])' 'v >= 20'
check "backends up" 'sum(portico_backend_up{upstream="orders"})' 'v == 2'
check "upstream requests" 'sum(portico_upstream_requests_total{upstream="orders",code="200"})' 'v >= 20'
check "process metrics" 'process_resident_memory_bytes{job="portico"}' 'v > 0'
check "build info" 'count(portico_build_info{job="portico"} == 1)' 'v == 1'
check "upstream errors exported" 'count(portico_upstream_errors_total{upstream="orders"})' 'v == 14'
echo "e2e prometheus: all checks passed"
