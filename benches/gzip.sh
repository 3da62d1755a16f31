#!/usr/bin/env bash
# What gzip costs nginx (`gzip on`) and portico (`[compression]`), in
# user-space instructions per request counted by callgrind, with the bytes
# each sends (see benches/gzip.py). Installs what it needs from Debian,
# builds portico in release mode. Takes about 5 minutes.
#   bash benches/gzip.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nginx valgrind wrk taskset curl; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing nginx valgrind wrk curl (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx valgrind wrk curl util-linux >/dev/null
fi
(service nginx stop || systemctl stop nginx) >/dev/null 2>&1 || true

echo "== building portico (release)"
cargo build --release -q --bin portico
exec python3 benches/gzip.py "$@"
