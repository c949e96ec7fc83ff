"""Serving under a bounded load: fp32 and int8, micro-batching on and off, 1 / 8 / 32 concurrent clients.

    WORKBENCH_HOME=/tmp/h1home .venv/bin/python benchmarks/bench_serve.py RUN [--requests 200] [--json]

Each configuration is a real `workbench serve` process on a free loopback port (started through
`workbench.deploy.start_server`); every configuration gets all client counts, interleaved (clients level by
level, configurations in turn), so a machine shared with other work slows them alike. Each level sends a
fixed number of requests (one evaluation text each, the run's evaluation split in order) and stops by
itself. Prints one JSON object: per configuration and client count, throughput (requests/s), latency
p50/p95/p99 (ms), errors and lost requests; then the goals: batching gain at 32 clients (batching on /
batch-1 serving, fp32), int8 gain (int8 / fp32 throughput, batching on, 32 clients), int8 agreement with
fp32 and the accuracy of each over the same texts. The int8 artifact must exist
(`workbench optimize RUN --int8`). The 1-minute load average is recorded before and after each level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {  # name: (artifact, max_batch_size, max_wait_ms)
    "fp32-batch1": (None, 1, 0.0),
    "fp32-batched": (None, 32, 5.0),
    "int8-batch1": ("int8", 1, 0.0),
    "int8-batched": ("int8", 32, 5.0),
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def _load(url: str, key: str, texts: list[str], clients: int) -> dict:
    import httpx

    latencies: list[float] = []
    labels: list[str | None] = [None] * len(texts)
    errors = 0
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < len(texts):
            i = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                r = await client.post("/v1/classify", json={"texts": [texts[i]]})
                if r.status_code == 200:
                    labels[i] = r.json()["results"][0]["label"]
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                 limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"requests": len(texts), "throughput_rps": round(len(texts) / wall, 2), "wall_s": round(wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1), "p95_ms": round(1000 * _pct(latencies, 0.95), 1),
            "p99_ms": round(1000 * _pct(latencies, 0.99), 1), "errors": errors,
            "lost": sum(label is None for label in labels) - errors, "labels": labels}


def _start(run_id: str, home: Path, artifact: str | None, batch: int, wait: float, log: Path):
    """`workbench serve` as its own process on a free loopback port (several per run: not through start_server,
    which keeps one server per run)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "workbench", "--home", str(home), "serve", run_id, "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", str(wait), "--max-chars", "1000000"]
    if artifact:
        cmd += ["--artifact", artifact]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc, url: str, key: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server {url} not ready after {timeout} s")


def main() -> int:
    import signal

    from workbench.deploy.adapter import eval_split
    from workbench.deploy.keys import ensure_api_key
    from workbench.store import RunStore

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--home", default=None)
    p.add_argument("--requests", type=int, default=200, help="requests per level (evaluation texts, in order)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args()
    store = RunStore(args.home)
    record = store.get(args.run)
    texts, gold, names = eval_split(record)
    reps = -(-args.requests // len(texts))
    texts, gold = (texts * reps)[: args.requests], (gold * reps)[: args.requests]
    clients = [int(c) for c in args.clients.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    key, _ = ensure_api_key(store.home)
    log = Path(record["dir"]) / "deploy" / "bench_serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    procs = {}
    results: dict[str, dict] = {name: {} for name in configs}
    try:
        for name in configs:
            artifact, batch, wait = CONFIGS[name]
            procs[name] = _start(record["id"], store.home, artifact, batch, wait, log)
        for name, (proc, url) in procs.items():
            _wait_ready(proc, url, key)
            asyncio.run(_load(url, key, texts[:8], 4))  # warm-up
            say(f"ready: {name} at {url}")
        for n in clients:  # interleaved: every configuration at this client count, in turn
            for name in configs:
                load_before = os.getloadavg()[0]
                r = asyncio.run(_load(procs[name][1], key, texts, n))
                r["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                results[name][str(n)] = r
                say(f"{name:<14} {n:>2} clients: {r['throughput_rps']:7.2f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                    f"p95 {r['p95_ms']:8.1f}  p99 {r['p99_ms']:8.1f}  errors {r['errors']}  lost {r['lost']}  "
                    f"load {r['load_avg_1m']}")
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=60)
            except Exception:
                proc.kill()

    def accuracy(labels: list) -> float | None:
        got = [names.index(x) if x in names else -1 for x in labels]
        return round(sum(a == b for a, b in zip(got, gold)) / len(gold), 4) if labels else None

    out: dict = {"run": record["id"], "requests_per_level": len(texts), "clients": clients, "cpu_count": os.cpu_count(),
                 "configs": {}, "goals": {}}
    for name, levels in results.items():
        out["configs"][name] = {n: {k: v for k, v in r.items() if k != "labels"} for n, r in levels.items()}
        first = next(iter(levels.values()), None)
        out["configs"][name]["accuracy"] = accuracy(first["labels"]) if first else None
    top = str(max(clients))
    goals = out["goals"]

    def thr(name: str) -> float | None:
        return results.get(name, {}).get(top, {}).get("throughput_rps")

    if thr("fp32-batched") and thr("fp32-batch1"):
        goals["batching_gain_at_%s_clients" % top] = round(thr("fp32-batched") / thr("fp32-batch1"), 2)
        goals["batching_gain_goal"] = ">= 3"
    if thr("int8-batched") and thr("fp32-batched"):
        goals["int8_gain_at_%s_clients" % top] = round(thr("int8-batched") / thr("fp32-batched"), 2)
        goals["int8_gain_goal"] = ">= 1.8"
        a, b = results["fp32-batched"][top]["labels"], results["int8-batched"][top]["labels"]
        goals["int8_agreement"] = round(sum(x == y for x, y in zip(a, b)) / len(a), 4)
        goals["int8_agreement_goal"] = ">= 0.99"
        goals["accuracy_fp32"], goals["accuracy_int8"] = accuracy(a), accuracy(b)
        goals["int8_accuracy_points_lost"] = round(100 * (accuracy(a) - accuracy(b)), 2)
    goals["errors"] = sum(r["errors"] for levels in results.values() for r in levels.values())
    goals["lost"] = sum(r["lost"] for levels in results.values() for r in levels.values())
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
