#!/usr/bin/env python3
"""What gzip costs nginx (`gzip on`) and portico (`[compression]`), each at
its default level (nginx's 1, portico's 2, which send about the same
bytes), passing through and answering from their caches, for HTML pages
of 4 KiB and 64 KiB that compress as real pages do (about 3 to 1),
fetched with `Accept-Encoding: gzip`. Two figures: user-space
instructions per request (callgrind, as benches/instructions.py counts
them), and CPU time per request under wrk (as benches/compare.py reads
it): callgrind counts each byte of a large `memset` (zlib clearing its
hash table, 128 KiB a response in zlib-rs) as an instruction, which the
CPU does far faster. Also prints the bytes each sends for a page: the
encoders differ (nginx links Debian's zlib, portico zlib-rs, a port of
zlib-ng)."""

import os
import random
import re
import statistics
import subprocess
import sys
import time

import compare
import instructions
from compare import WORK, free_port, nginx_conf, start, wait_port

SIZES = {"4k": 4 * 1024, "64k": 64 * 1024}


def page(size):
    """Pseudo-HTML of `size` bytes: paragraphs of words drawn from a fixed
    vocabulary, seeded, so every run serves the same bytes."""
    rng = random.Random(size)
    syllables = ["por", "ti", "co", "ca", "che", "lo", "ad", "ba", "lan", "cer", "up",
                 "stream", "re", "quest", "head", "er", "time", "out", "pool", "con"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(600)]
    out = ["<!doctype html><html><head><title>portico</title></head><body>\n"]
    length = len(out[0])
    while length < size:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        line = f'<p class="c{rng.randint(1, 9)}">{text}.</p>\n'
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


def main():
    www = os.path.join(WORK, "www")
    os.makedirs(www)
    for name, size in SIZES.items():
        with open(os.path.join(www, f"{name}.html"), "wb") as f:
            f.write(page(size))
    origin = free_port()
    start("origin", ["nginx", "-c", nginx_conf("origin", f"""
  types {{ text/html html; }}
  server {{ listen 127.0.0.1:{origin}; root {www};
    location / {{ add_header Cache-Control "max-age=60"; }} }}""")], compare.LOAD_CPU)
    wait_port(origin, "/4k.html")

    systems = instructions.proxies(
        origin,
        nginx_extra="gzip on; gzip_comp_level 1; gzip_types text/html; "
                    "gzip_min_length 1024; gzip_vary on;",
        portico_extra='[compression]\ntypes = ["text/html"]\nmin_size = "1KiB"\n')

    os.environ["RUST_LOG"] = "warn"
    instructions.HEADERS = ["-H", "Accept-Encoding: gzip"]
    results, sent = {}, {}
    for size in SIZES:
        path = f"/{size}.html"
        for name, cmd, port in systems:
            per_request, requests = instructions.measure(name, cmd, port, path)
            results[(name, size)] = per_request
            print(f"{size:>3} {name:<14} {per_request:>9.0f} instructions/request "
                  f"({requests} requests)", file=sys.stderr)
        # Bytes on the wire for the page, from a proxy started for it alone.
        for name, cmd, port in systems[::2]:
            proc = start(f"{name}-size", cmd, compare.PROXY_CPU)
            wait_port(port, path)
            body = subprocess.run(["curl", "-s", "-H", "Accept-Encoding: gzip",
                                   f"http://127.0.0.1:{port}{path}"],
                                  capture_output=True, check=True).stdout
            sent[(name, size)] = len(body)
            proc.terminate()
            proc.wait(timeout=30)

    # CPU time per request without valgrind, whose count makes much of
    # the memset zlib-rs clears its hash table with (one `rep stosb`
    # iteration a byte), with 64 connections, ROUNDS rounds interleaved.
    cpu = {}
    running = [(name, start(name, cmd, compare.PROXY_CPU), port) for name, cmd, port in systems]
    for name, _, port in running:
        wait_port(port, "/4k.html")
    for _ in range(compare.ROUNDS):
        for size in SIZES:
            for name, proc, port in running:
                before = compare.cpu_seconds(proc.pid)
                out = subprocess.run(
                    ["taskset", "-c", compare.LOAD_CPU, "wrk", "-t1", f"-c{compare.CONNECTIONS}",
                     f"-d{compare.DURATION}s", "-H", "Accept-Encoding: gzip",
                     f"http://127.0.0.1:{port}/{size}.html"],
                    capture_output=True, text=True, check=True).stdout
                total = int(re.search(r"(\d+) requests in", out).group(1))
                used = compare.cpu_seconds(proc.pid) - before
                cpu.setdefault((name, size), []).append(used / total * 1e6)
                print(f"{size:>3} {name:<14} {used / total * 1e6:8.1f} us CPU/request", file=sys.stderr)

    print()
    print(f"gzip, {time.strftime('%Y-%m-%d')}: user-space instructions per request (callgrind, "
          f"wrk -t1 -c{instructions.CONNECTIONS} -d{instructions.DURATION}s), CPU per request "
          f"(wrk -c{compare.CONNECTIONS} -d{compare.DURATION}s, {compare.ROUNDS} rounds, medians), "
          "Accept-Encoding: gzip, default levels (nginx 1, portico 2)")
    print("| system | page | instructions/request | vs nginx | CPU us/request | vs nginx | bytes sent |")
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        for name, _, _ in systems:
            ref = results[("nginx-cache" if "cache" in name else "nginx", size)]
            value = results[(name, size)]
            bytes_sent = sent.get((name.replace("-cache", ""), size), "")
            ref_name = "nginx-cache" if "cache" in name else "nginx"
            us = statistics.median(cpu[(name, size)])
            ref_us = statistics.median(cpu[(ref_name, size)])
            print(f"| {name} | {size} | {value:.0f} | {value / ref:.2f} | {us:.1f} | "
                  f"{us / ref_us:.2f} | {bytes_sent} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        compare.cleanup()
