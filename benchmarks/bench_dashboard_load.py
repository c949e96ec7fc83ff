"""A bounded load check of the Voila dashboard: N page loads from a loopback client, then idle-kernel culling.

    python benchmarks/bench_dashboard_load.py                       # 20 loads, kernels culled after 30 s idle
    python benchmarks/bench_dashboard_load.py --loads 5 --cull-idle 20

It starts scripts/serve_dashboard.py on 127.0.0.1 with a fresh run store, requests the page N times one
after the other (each request starts a kernel and runs the dashboard in it, as a visitor's tab does; the
client then goes away, as a closed tab does), and samples the memory (RSS) of the server and all its kernels.
It prints one line per load and a summary: every load must answer 200, every kernel must be culled, and the
server process itself may keep at most --slack MB per load (exit code 1 otherwise; the kernels' memory is
then back, since they are gone).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def server_mb(proc: psutil.Process) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def kernels(proc: psutil.Process) -> int:
    count = 0
    for p in tree(proc)[1:]:
        try:
            count += "ipykernel_launcher" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            pass
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--cull-idle", type=int, default=30, help="seconds a closed page's kernel may idle")
    parser.add_argument("--slack", type=float, default=50.0, help="MB per load the server process may keep")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per page load")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_dashboard.py"), "--port", "0",
                               "--cull-idle", str(args.cull_idle)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    proc = psutil.Process(server.pid)
    peak = {"rss": 0.0, "kernels": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak["rss"] = max(peak["rss"], rss_mb(proc))
            peak["kernels"] = max(peak["kernels"], kernels(proc))

    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", server.stdout.readline()).group(0)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "voila/static/voila.js", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        time.sleep(2)
        start_rss, start_server = rss_mb(proc), server_mb(proc)
        load = os.getloadavg()[0]
        print(f"server up: {start_rss:.0f} MB (load average {load:.1f})", flush=True)
        threading.Thread(target=sample, daemon=True).start()

        times, codes = [], []
        for i in range(args.loads):
            t0 = time.monotonic()
            with urllib.request.urlopen(url, timeout=args.timeout) as response:
                body = response.read()
                codes.append(response.status)
            times.append(time.monotonic() - t0)
            print(f"load {i + 1:2d}: {response.status} in {times[-1]:5.1f} s, {len(body) >> 10} KiB; "
                  f"{kernels(proc)} kernels, {rss_mb(proc):6.0f} MB (server {server_mb(proc):.0f} MB; "
                  f"load average {os.getloadavg()[0]:.1f})",
                  flush=True)
        after_loads = rss_mb(proc)
        t_end = time.monotonic()
        deadline = t_end + args.cull_idle + 120
        while kernels(proc) and time.monotonic() < deadline:
            time.sleep(2)
        culled_after = time.monotonic() - t_end
        time.sleep(2)
        end_rss, left, end_server = rss_mb(proc), kernels(proc), server_mb(proc)
        stop.set()
        print(f"\n{args.loads} loads: all 200: {all(c == 200 for c in codes)}; median {statistics.median(times):.1f} s, "
              f"max {max(times):.1f} s")
        print(f"memory: {start_rss:.0f} MB at start, peak {peak['rss']:.0f} MB with at most {peak['kernels']} kernels, "
              f"{after_loads:.0f} MB after the last load, {end_rss:.0f} MB {culled_after:.0f} s later "
              f"({left} kernels left; cull-idle {args.cull_idle} s)")
        growth = (end_server - start_server) / args.loads
        print(f"server process: {start_server:.0f} MB at start, {end_server:.0f} MB at the end "
              f"({growth:+.1f} MB per load)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        ok = all(c == 200 for c in codes) and left == 0 and growth <= args.slack
        return 0 if ok else 1
    finally:
        stop.set()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
