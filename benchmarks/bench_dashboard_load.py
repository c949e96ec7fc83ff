"""A bounded load check of the Voila dashboard: N page loads from a loopback client, then idle-kernel culling,
for the server with glibc's allocator as it is (as shipped) and with a fixed mmap threshold (--allocator tuned).

    python benchmarks/bench_dashboard_load.py                       # 20 loads per server, default then tuned
    python benchmarks/bench_dashboard_load.py --loads 5 --cull-idle 20 --allocators tuned
    python benchmarks/bench_dashboard_load.py --memory-log          # + Python objects / malloc split (slower)
    python benchmarks/bench_dashboard_load.py --memory-log --memory-log-after 1,5,15 --memory-frames 25
                                             # + reports after those loads, and tracemalloc snapshots to compare

For each allocator setting (scripts/serve_dashboard.py --allocator) and round, it starts the server on
127.0.0.1 with a fresh run store, requests the page N times one after the other (each request starts a kernel
and runs the dashboard in it, as a visitor's tab does, then fetches plotly's widget module file as a first-time
visitor's browser does; the client then goes away, as a closed tab does: no websocket is opened; a load
refused with 503 because --max-kernels pages are still open is tried again 5 s later and counted in
refused_full), waits until every kernel is culled, and samples the memory (RSS) of the server and its kernels. Rounds alternate
the order of the settings. The figure is the server process's growth per load: (RSS after culling - RSS at
start) / N, and the same from after the first load (the first load imports and compiles what every later one
reuses). It prints one line per load and one JSON object, and writes it to
benchmarks/results/bench_dashboard_load-<short sha>.json. Exit code 1 when a load fails, a kernel is not
culled, or the server as shipped (--allocator default) grows by more than --bound MB per load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTLY_MODULE = "workbench/plotly/widgetbundle.js"  # served by scripts/dashboard_voila.py
FULL_RETRY_S = 5  # after a 503 (every page of --max-kernels still open), the load is tried again this much later


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


def memory_log(pid: int, path: Path, lines: int) -> dict[str, float]:
    """Ask the server for its memory report (SIGUSR1) and return it, or {} when none comes."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > lines:
            return json.loads(path.read_text().splitlines()[lines])
        time.sleep(0.5)
    return {}


def start_server(allocator: str, cull_idle: int, log: Path | None,
                 frames: int = 0) -> tuple[subprocess.Popen, str]:
    home = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if log is not None:
        env["WORKBENCH_DASHBOARD_MEMORY_LOG"] = str(log)
        if frames:
            env["WORKBENCH_DASHBOARD_MEMORY_FRAMES"] = str(frames)
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_dashboard.py"), "--port", "0",
                               "--cull-idle", str(cull_idle), "--allocator", allocator], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    url = re.search(r"http://127\.0\.0\.1:\d+/", server.stdout.readline()).group(0)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "voila/static/voila.js", timeout=5).close()
            return server, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def one_server(allocator: str, args: argparse.Namespace) -> dict[str, Any]:
    """N loads against a fresh server with this allocator setting; its memory before, during and after."""
    log = Path(tempfile.mkdtemp(prefix="bench-dashboard-log-")) / "memory.jsonl" if args.memory_log else None
    server, url = start_server(allocator, args.cull_idle, log, args.memory_frames)
    if log:
        print(f"[{allocator}] memory log: {log}", flush=True)
    proc = psutil.Process(server.pid)
    peak = {"rss": 0.0, "kernels": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak["rss"] = max(peak["rss"], rss_mb(proc))
            peak["kernels"] = max(peak["kernels"], kernels(proc))

    try:
        time.sleep(2)
        reports = [memory_log(server.pid, log, 0)] if log else []
        start_server_mb, start_total = server_mb(proc), rss_mb(proc)
        print(f"[{allocator}] server up: {start_server_mb:.0f} MB (load average {os.getloadavg()[0]:.1f})",
              flush=True)
        threading.Thread(target=sample, daemon=True).start()
        times, codes, after, plotly_bytes = [], [], [], []
        refused_full = 0
        for i in range(args.loads):
            while True:  # a full dashboard (503: --max-kernels pages open) is tried again, as its page says
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(url, timeout=args.timeout) as response:
                        body = response.read()
                        codes.append(response.status)
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code != 503:
                        raise
                    refused_full += 1
                    print(f"[{allocator}] load {i + 1:2d}: 503, the dashboard is full ({kernels(proc)} kernels); "
                          f"again in {FULL_RETRY_S} s", flush=True)
                    time.sleep(FULL_RETRY_S)
            times.append(time.monotonic() - t0)
            if not args.no_plotly_fetch:  # what a first-time visitor's browser fetches next (then keeps cached)
                with urllib.request.urlopen(url + PLOTLY_MODULE, timeout=args.timeout) as module:
                    plotly_bytes.append(len(module.read()))
                    codes.append(module.status)
            after.append(server_mb(proc))
            if log and i + 1 in args.memory_log_after:
                reports.append({"after_load": i + 1, **memory_log(server.pid, log, len(reports))})
            print(f"[{allocator}] load {i + 1:2d}: {response.status} in {times[-1]:5.1f} s, {len(body) >> 10} KiB; "
                  f"{kernels(proc)} kernels, {rss_mb(proc):6.0f} MB (server {after[-1]:.0f} MB; "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)
        t_end = time.monotonic()
        while kernels(proc) and time.monotonic() < t_end + args.cull_idle + 120:
            time.sleep(2)
        culled_after = time.monotonic() - t_end
        time.sleep(2)
        end_server_mb, left = server_mb(proc), kernels(proc)
        if log:
            reports.append(memory_log(server.pid, log, len(reports)))
        stop.set()
        steps = [b - a for a, b in zip([start_server_mb, *after], after)]
        return {
            "allocator": allocator, "loads": args.loads, "all_200": all(c == 200 for c in codes),
            "load_s_median": statistics.median(times), "load_s_max": max(times),
            "server_mb_start": start_server_mb, "server_mb_after_first_load": after[0],
            "server_mb_after_loads": after[-1], "server_mb_end": end_server_mb,
            "growth_mb_per_load": (end_server_mb - start_server_mb) / args.loads,
            "growth_mb_per_load_after_first": (end_server_mb - after[0]) / max(args.loads - 1, 1),
            "growth_mb_per_load_median_step": statistics.median(steps),
            "peak_total_mb": peak["rss"], "peak_kernels": peak["kernels"], "start_total_mb": start_total,
            "kernels_left": left, "culled_after_s": culled_after, "memory_reports": reports,
            "refused_full": refused_full,
            "plotly_module_fetches": len(plotly_bytes), "plotly_module_bytes": max(plotly_bytes, default=0),
        }
    finally:
        stop.set()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


def short_sha() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def summary(runs: list[dict[str, Any]], allocator: str) -> dict[str, float]:
    mine = [r for r in runs if r["allocator"] == allocator]
    keys = ("growth_mb_per_load", "growth_mb_per_load_after_first", "growth_mb_per_load_median_step",
            "server_mb_after_first_load", "peak_total_mb", "load_s_median")
    return {k: statistics.median(r[k] for r in mine) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="servers per allocator setting, in alternating order")
    parser.add_argument("--allocators", default="default,tuned", help="comma-separated: default, tuned")
    parser.add_argument("--cull-idle", type=int, default=30, help="seconds a closed page's kernel may idle")
    parser.add_argument("--bound", type=float, default=2.0, help="MB per load the shipped server may keep")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per page load")
    parser.add_argument("--memory-log", action="store_true",
                        help="also ask the server for its Python-object / malloc split (tracemalloc: slower)")
    parser.add_argument("--memory-log-after", type=lambda text: {int(n) for n in text.split(",") if n},
                        default=set(), metavar="N,N",
                        help="with --memory-log: a report after each of these loads too")
    parser.add_argument("--memory-frames", type=int, default=0, metavar="N",
                        help="with --memory-log: trace N frames deep and dump a tracemalloc snapshot with each "
                             "report (<log>.<report>.snapshot)")
    parser.add_argument("--no-plotly-fetch", action="store_true",
                        help="do not fetch plotly's widget module after each page (a browser fetches it once)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write the JSON under {RESULTS}")
    args = parser.parse_args(argv)
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]

    runs = []
    for r in range(args.rounds):
        for allocator in (allocators if r % 2 == 0 else allocators[::-1]):
            runs.append(one_server(allocator, args))
    result = {
        "benchmark": "bench_dashboard_load", "commit": short_sha(), "loads": args.loads, "rounds": args.rounds,
        "cull_idle_s": args.cull_idle, "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()[0],
        "summary": {a: summary(runs, a) for a in allocators}, "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"bench_dashboard_load-{result['commit']}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    ok = all(r["all_200"] and r["kernels_left"] == 0 for r in runs)
    if "default" in allocators:
        ok = ok and result["summary"]["default"]["growth_mb_per_load"] <= args.bound
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
