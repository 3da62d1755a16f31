#!/usr/bin/env python3
"""User-space instructions per request, counted by valgrind's callgrind,
for nginx and portico in front of the same origin as benches/compare.py.

Timings on a shared VM drift by tens of percent between runs; the number of
instructions a proxy executes per request does not (repeat runs agree to
well under 1%). That makes this the figure to judge a hot-path change by,
and to compare the user-space part of portico's work with nginx's. Kernel
time (the loopback TCP path, the same syscalls for both) is not counted.

Each system runs alone under callgrind; wrk warms it up, the counters are
zeroed, wrk runs DURATION seconds, the counters are dumped and divided by
the requests wrk completed."""

import glob
import os
import re
import subprocess
import sys
import time

import compare
from compare import WORK, free_port, nginx_conf, portico_config, start, start_origin, wait_port

DURATION = int(os.environ.get("DURATION", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
# Fields every wrk request carries (benches/gzip.py sends Accept-Encoding).
HEADERS = []


def callgrind(name, cmd):
    out = os.path.join(WORK, f"{name}.callgrind")
    proc = start(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + cmd,
                 compare.PROXY_CPU)
    return proc, out


def measure(name, cmd, port, path):
    proc, out = callgrind(f"{name}{path.replace('/', '-')}", cmd)
    wait_port(port, path, timeout=120)
    load = ["taskset", "-c", compare.LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}"] + HEADERS
    subprocess.run(load + ["-d1s", f"http://127.0.0.1:{port}{path}"], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
    text = subprocess.run(load + [f"-d{DURATION}s", f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, check=True).stdout
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    if re.search(r"Non-2xx or 3xx responses", text):
        raise SystemExit(f"wrk saw errors from {name} {path}")
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Under valgrind on a busy machine the exit can crawl; the counts
        # were dumped above, so nothing is lost by not waiting.
        proc.kill()
        proc.wait(timeout=30)
    # The dump after zeroing is the file with the highest part number.
    dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    with open(dumps[-1]) as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
    return total / requests, requests


def proxies(origin, nginx_extra="", portico_extra=""):
    """nginx and portico in front of `origin`, each passing through and
    caching, as (name, command, port); `nginx_extra` goes into nginx's
    http block, `portico_extra` at the end of portico's file."""
    upstream = f"upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}"
    proxy_common = 'proxy_http_version 1.1; proxy_set_header Connection "";'
    systems = []
    for name, cache in [("nginx", ""), ("nginx-cache", "proxy_cache c;")]:
        port = free_port()
        # One process, so callgrind sees the worker.
        conf = nginx_conf(name, f"""
  {upstream}
  {nginx_extra}
  proxy_cache_path {WORK}/{name}-store keys_zone=c:10m max_size=256m;
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://origin; {proxy_common} {cache} }} }}""")
        systems.append((name, ["nginx", "-g", "master_process off;", "-c", conf], port))
    for name, cache in [("portico", False), ("portico-cache", True)]:
        port = free_port()
        cfg = portico_config(name, port, origin, cache)
        with open(cfg, "a") as f:
            f.write(portico_extra)
        systems.append((name, [compare.PORTICO, "--threads", "1", "--config", cfg], port))
    return systems


def main():
    origin = free_port()
    start_origin(origin)
    wait_port(origin)
    systems = proxies(origin)

    os.environ["RUST_LOG"] = "warn"
    results = {}
    for size in ["1k", "64k"]:
        for name, cmd, port in systems:
            per_request, requests = measure(name, cmd, port, f"/{size}")
            results[(name, size)] = per_request
            print(f"{size:>3} {name:<14} {per_request:>9.0f} instructions/request "
                  f"({requests} requests)", file=sys.stderr)

    print()
    print(f"user-space instructions per request (callgrind), {time.strftime('%Y-%m-%d')}, "
          f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s")
    print("| system | size | instructions/request | vs nginx |")
    print("|---|---|---|---|")
    for size in ["1k", "64k"]:
        for name, _, _ in systems:
            ref = results[("nginx-cache" if "cache" in name else "nginx", size)]
            value = results[(name, size)]
            print(f"| {name} | {size} | {value:.0f} | {value / ref:.2f} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        compare.cleanup()
