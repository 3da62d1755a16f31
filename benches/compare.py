#!/usr/bin/env python3
"""Runs nginx, HAProxy, Varnish and portico in front of one nginx origin and
measures them with wrk, round by round (each round in a rotated order) so
drift hits all alike.

The proxy under test is pinned to CPU 0; the origin and wrk share CPU 1.
On two cores the pass-through req/s of a good proxy is capped by the load
generator's core, so the sharp figure is CPU time per request on the proxy's
core (utime+stime from /proc over the run, divided by requests). RSS is read
at the end of each load and again SETTLE seconds after the last load of a
round, so memory a system gives back once idle counts for all alike."""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "4"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
SETTLE = float(os.environ.get("SETTLE", "2.5"))
PORTICO = os.path.abspath("target/release/portico")
TICK = os.sysconf("SC_CLK_TCK")
WORK = tempfile.mkdtemp(prefix="portico-bench-")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name, cmd, cpu):
    log = open(os.path.join(WORK, f"{name}.log"), "w")
    proc = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=log, stderr=log,
                            start_new_session=True)
    PROCS.append(proc)
    return proc


def wait_port(port, path="/1k", timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1 2"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"port {port} never answered; logs in {WORK}")


def tree(pid):
    """pid and all its descendants."""
    pids = [pid]
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) in pids and int(p) not in pids:
                pids.append(int(p))
        except OSError:
            pass
    # One more pass catches grandchildren (nginx/varnish workers).
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid in pids and int(p) not in pids:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def rss_mib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def seconds(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(port, path):
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s",
         "--latency", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = seconds(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = seconds(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} errors on :{port}{path}")
    return rps, total, p50, p99


def nginx_conf(name, body):
    path = os.path.join(WORK, f"{name}.conf")
    tmp = os.path.join(WORK, f"{name}-tmp")
    os.makedirs(tmp, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"""
daemon off; worker_processes 1; pid {WORK}/{name}.pid; error_log {WORK}/{name}.err warn;
user root;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 100000;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  {body}
}}
""")
    return path


def portico_config(name, port, origin, cache):
    """A portico config file in front of the origin; returns its path."""
    cfg = os.path.join(WORK, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[server]
listen = ["127.0.0.1:{port}"]
[admin]
listen = "127.0.0.1:{free_port()}"
[[upstream]]
name = "origin"
backends = ["127.0.0.1:{origin}"]
max_idle_per_backend = 128
[[route]]
upstream = "origin"
""" + ("[cache]\nmax_size = \"256MiB\"\n" if cache else ""))
    return cfg


def start_origin(port):
    """The nginx origin on `port`, serving /1k and /64k with max-age=60."""
    www = os.path.join(WORK, "www")
    os.makedirs(www)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    with open(os.path.join(www, "64k"), "wb") as f:
        f.write(b"y" * 65536)
    start("origin", ["nginx", "-c", nginx_conf("origin", f"""
  server {{ listen 127.0.0.1:{port}; root {www};
    location / {{ add_header Cache-Control "max-age=60"; }} }}""")], LOAD_CPU)


def main():
    ports = {name: free_port() for name in
             ["origin", "nginx", "nginx-cache", "haproxy", "varnish", "portico", "portico-cache"]}
    origin = ports["origin"]
    start_origin(origin)

    upstream = f"upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}"
    proxy_common = "proxy_http_version 1.1; proxy_set_header Connection \"\";"
    systems = {}
    systems["nginx"] = start("nginx", ["nginx", "-c", nginx_conf("nginx", f"""
  {upstream}
  server {{ listen 127.0.0.1:{ports['nginx']};
    location / {{ proxy_pass http://origin; {proxy_common} }} }}""")], PROXY_CPU)
    systems["nginx-cache"] = start("nginx-cache", ["nginx", "-c", nginx_conf("nginx-cache", f"""
  {upstream}
  proxy_cache_path {WORK}/nginx-cache keys_zone=c:10m max_size=256m;
  server {{ listen 127.0.0.1:{ports['nginx-cache']};
    location / {{ proxy_pass http://origin; {proxy_common} proxy_cache c; }} }}""")], PROXY_CPU)

    haproxy_cfg = os.path.join(WORK, "haproxy.cfg")
    with open(haproxy_cfg, "w") as f:
        f.write(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{ports['haproxy']}
  default_backend be
backend be
  server origin 127.0.0.1:{origin} maxconn 1000
""")
    systems["haproxy"] = start("haproxy", ["haproxy", "-f", haproxy_cfg, "-db"], PROXY_CPU)

    systems["varnish"] = start("varnish", [
        "varnishd", "-F", "-j", "none", "-n", os.path.join(WORK, "varnish"),
        "-a", f"127.0.0.1:{ports['varnish']}", "-b", f"127.0.0.1:{origin}",
        "-s", "malloc,256m", "-p", "thread_pools=1"], PROXY_CPU)

    for name, cache in [("portico", False), ("portico-cache", True)]:
        cfg = portico_config(name, ports[name], origin, cache)
        env = dict(os.environ, RUST_LOG="warn")
        log = open(os.path.join(WORK, f"{name}.log"), "w")
        proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, PORTICO, "--threads", "1", "--config", cfg],
                                stdout=log, stderr=log, env=env, start_new_session=True)
        PROCS.append(proc)
        systems[name] = proc

    for name, port in ports.items():
        wait_port(port)
    time.sleep(1)
    idle = {name: rss_mib(proc.pid) for name, proc in systems.items()}

    runs = [("direct origin", "origin", None)]
    runs += [(f"{n} pass-through", n, systems[n]) for n in ["nginx", "haproxy", "portico"]]
    runs += [(f"{n} cache hit", n, systems[n]) for n in ["nginx-cache", "varnish", "portico-cache"]]
    results = {}
    for round_ in range(ROUNDS):
        # Each round starts one system further on, so no system always
        # runs first or right after the busiest one.
        turn = round_ % len(runs)
        order = runs[turn:] + runs[:turn]
        for size in ["1k", "64k"]:
            for label, name, proc in order:
                path = f"/{size}"
                if proc is not None and round_ == 0:
                    wrk_warm = subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{ports[name]}{path}"])
                before = cpu_seconds(proc.pid) if proc else 0.0
                rps, total, p50, p99 = wrk(ports[name], path)
                after = cpu_seconds(proc.pid) if proc else 0.0
                cpu_us = (after - before) / total * 1e6 if proc else float("nan")
                rss = rss_mib(proc.pid) if proc else float("nan")
                results.setdefault((label, size), []).append([rps, p50, p99, cpu_us, rss])
                print(f"round {round_ + 1} {size:>3} {label:<24} {rps:>10.0f} req/s  p99 {p99 * 1e3:6.2f} ms  cpu/req {cpu_us:6.2f} us", file=sys.stderr)
            # What each system holds once the load is over: the last one
            # ran just now, so give it SETTLE seconds like the others had.
            time.sleep(SETTLE)
            for label, name, proc in runs:
                settled = rss_mib(proc.pid) if proc else float("nan")
                results[(label, size)][-1].append(settled)

    print()
    print(f"portico comparison, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s, {ROUNDS} rounds (medians); proxy pinned to CPU {PROXY_CPU}")
    header = (f"| {'system':<24} | size | req/s | p50 ms | p99 ms | CPU us/req | RSS idle MiB | "
              f"RSS end of load MiB | RSS {SETTLE:g} s later MiB | req/s vs nginx | CPU vs nginx |")
    print(header)
    print("|" + "|".join("---" for _ in range(11)) + "|")
    for size in ["1k", "64k"]:
        med = {}
        for label, name, _ in runs:
            rows = results[(label, size)]
            med[label] = [statistics.median(col) for col in zip(*rows)]
        ref_pass = med["nginx pass-through"]
        ref_cache = med["nginx-cache cache hit"]
        for label, name, _ in runs:
            rps, p50, p99, cpu, rss, settled = med[label]
            ref = ref_cache if "cache" in label else ref_pass
            idle_rss = idle.get(name, float("nan"))
            print(f"| {label:<24} | {size} | {rps:.0f} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | "
                  f"{cpu:.2f} | {idle_rss:.1f} | {rss:.1f} | {settled:.1f} | {rps / ref[0]:.2f} | {cpu / ref[3]:.2f} |")


def cleanup():
    for proc in PROCS:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
    for proc in PROCS:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
