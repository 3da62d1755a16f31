#!/usr/bin/env bash
# User-space instructions per request for nginx and portico, counted by
# callgrind: a figure that does not drift with a noisy machine, for judging
# hot-path changes. Installs what it needs from Debian, builds portico in
# release mode, then runs benches/instructions.py. Takes about 2 minutes.
#   bash benches/instructions.sh
#   DURATION=5 CONNECTIONS=32 bash benches/instructions.sh
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
# benches/gzip.sh runs benches/gzip.py through here.
exec python3 "benches/${BENCH:-instructions}.py" "$@"
