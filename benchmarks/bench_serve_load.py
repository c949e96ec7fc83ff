"""No request lost under overload: 128 concurrent classify clients against a real `workbench serve` process.

    WORKBENCH_HOME=/work/serve-runs .venv/bin/python benchmarks/bench_serve_load.py [RUN] [--requests 2000]
        [--clients 128] [--warmup 200] [--rounds 2] [--client raw|httpx] [--no-retrying] [--no-drain-check]

The run's home is copied to a temporary folder first (the served run's files are never touched). Two
admissions of the micro-batcher are compared, interleaved round by round (a machine shared with other work
slows both alike), each a fresh server process on a free loopback port:
- "count": `workbench serve RUN --max-queue-wait-s 0`: the bound on queued items only (`max_queue`);
- "wait": `workbench serve RUN` as shipped (started through `workbench.deploy.start_server`): the count bound
  and the expected-wait budget (`max_queue_wait_s`, 0.5 s).

Each server gets a warm-up (`--warmup` requests), then `--requests` requests from `--clients` clients at once,
one keep-alive connection each, one evaluation text per request, no retries: a storm. The default client
(`--client raw`) writes prepared request bytes on asyncio streams; httpx's async client costs about ten
times its CPU per request, and on a 2-core machine the load generator then measures mostly itself. Recorded
per server: answers by status, Retry-After on every 503, client errors by kind (a reset or a disconnect
without an answer is a lost request), latency of the accepted (200) requests p50/p95/p99 and of the shed
ones, the server's RSS before the warm-up, after it, right after the load and after 2 quiet seconds (growth:
settled minus after the warm-up). On the "wait" server a second load follows whose clients honour
Retry-After (each waits it, times 1 to 1.5, and sends the same request again): how many requests end with a
200, in how many attempts, and the time from a request's first attempt to its 200. Last, the drain: `workbench serve` is sent SIGTERM while the clients are sending: every request it read
must be answered, connections opened after it refused, and the process must exit 0. Prints one JSON object
(medians over rounds under "summary"); `--out` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("count", "wait")
SETTLE_S = 2.0  # quiet seconds after a load before the server's memory is read again


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _error_kind(exc: Exception) -> str:
    """A client error by what it means for the request: refused (never sent), reset / disconnected (sent, lost),
    timeout."""
    import httpx

    text = str(exc).lower()
    if isinstance(exc, httpx.ConnectError):
        return "refused" if "refused" in text else "connect_error"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if "reset" in text:
        return "reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "disconnected"
    return type(exc).__name__


class _RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request written as prepared bytes, the answer's
    status line and headers read, its body read by Content-Length. About a tenth of httpx's CPU per request, so
    128 clients on the server's own machine measure the server, not the load generator's event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")  # IncompleteReadError: closed without an answer
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _raw_error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, (asyncio.IncompleteReadError, BrokenPipeError)):
        return "disconnected"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return type(exc).__name__


def _request_bytes(host: str, port: int, key: str, text: str) -> bytes:
    body = json.dumps({"texts": [text]}).encode()
    return (f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _load(url: str, key: str, texts: list[str], clients: int, requests: int,
                on_progress: Any = None, client_kind: str = "raw") -> dict[str, Any]:
    """`requests` classify requests from `clients` concurrent clients (`client_kind` "raw": _RawConnection,
    "httpx": httpx.AsyncClient), no retries; what came back."""
    if client_kind == "raw":
        return await _load_raw(url, key, texts, clients, requests, on_progress)
    import httpx

    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    accepted: list[float] = []
    shed: list[float] = []
    no_retry_after = 0
    sent = done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent, done, no_retry_after
        while sent < requests:
            i = sent
            sent += 1
            start = time.perf_counter()
            try:
                r = await client.post("/v1/classify", json={"texts": [texts[i % len(texts)]]})
            except httpx.HTTPError as exc:
                errors[_error_kind(exc)] += 1
                continue
            finally:
                done += 1
                if on_progress is not None:
                    on_progress(done)
            elapsed = time.perf_counter() - start
            statuses[r.status_code] += 1
            if r.status_code == 200:
                accepted.append(elapsed)
            elif r.status_code == 503:
                shed.append(elapsed)
                no_retry_after += "retry-after" not in r.headers

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                 limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return _outcome(requests, wall, statuses, errors, accepted, shed, no_retry_after)


async def _load_raw(url: str, key: str, texts: list[str], clients: int, requests: int,
                    on_progress: Any = None, retry: bool = False) -> dict[str, Any]:
    """`_load` on _RawConnection. `retry`: a client that gets a 503 waits its Retry-After (times 1 to 1.5, so
    that the clients do not all come back at once) and sends the same request again, as a well-behaved client
    does; then the figures are per attempt, and per request from its first attempt to its 200 (`end_to_end`)."""
    import random
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    prepared = [_request_bytes(host, port, key, t) for t in texts]
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    accepted: list[float] = []
    shed: list[float] = []
    end_to_end: list[float] = []
    no_retry_after = 0
    sent = done = 0
    jitter = random.Random(0)

    async def worker() -> None:
        nonlocal sent, done, no_retry_after
        conn = _RawConnection(host, port)
        try:
            while sent < requests:
                i = sent
                sent += 1
                first = time.perf_counter()
                while True:
                    start = time.perf_counter()
                    try:
                        status, headers = await asyncio.wait_for(conn.post(prepared[i % len(prepared)]), 120)
                    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                        errors[_raw_error_kind(exc)] += 1
                        conn.close()
                        break
                    elapsed = time.perf_counter() - start
                    statuses[status] += 1
                    if status == 200:
                        accepted.append(elapsed)
                        end_to_end.append(time.perf_counter() - first)
                    elif status == 503:
                        shed.append(elapsed)
                        no_retry_after += "retry-after" not in headers
                        if retry and "retry-after" in headers:
                            await asyncio.sleep(float(headers["retry-after"]) * (1 + 0.5 * jitter.random()))
                            continue
                    break
                done += 1
                if on_progress is not None:
                    on_progress(done)
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    out = _outcome(requests, wall, statuses, errors, accepted, shed, no_retry_after)
    if retry:
        out["attempts"] = sum(statuses.values()) + sum(errors.values())
        out["answered_200"] = len(end_to_end)
        out["end_to_end_p50_ms"] = round(1000 * _pct(end_to_end, 0.5), 1) if end_to_end else None
        out["end_to_end_p95_ms"] = round(1000 * _pct(end_to_end, 0.95), 1) if end_to_end else None
    return out


def _outcome(requests: int, wall: float, statuses: Counter, errors: Counter, accepted: list[float],
             shed: list[float], no_retry_after: int) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {"requests": requests, "wall_s": round(wall, 2), "status": {str(k): v for k, v in sorted(statuses.items())},
            "errors": dict(errors), "lost": sum(v for k, v in errors.items() if k != "refused"),
            "retry_after_missing": no_retry_after, "accepted_rps": round(len(accepted) / wall, 2),
            "accepted_p50_ms": ms(_pct(accepted, 0.5)), "accepted_p95_ms": ms(_pct(accepted, 0.95)),
            "accepted_p99_ms": ms(_pct(accepted, 0.99)), "shed_p50_ms": ms(_pct(shed, 0.5))}


def _start(arm: str, run_id: str, home: Path) -> tuple[int, str, Any]:
    """A server: (pid, url, its Popen or None when start_server made it). The "wait" arm is `workbench serve` as
    it is (start_server); "count" is the same command line with `--max-queue-wait-s 0` (queue length only)."""
    from workbench.deploy.server import server_status, start_server

    if arm == "wait":
        info = start_server(run_id, home, timeout=600)
        return int(info["pid"]), info["url"], None
    log = open(home / f"bench_serve_load-{arm}.log", "ab")
    cmd = [sys.executable, "-m", "workbench", "--home", str(home), "serve", run_id, "--max-queue-wait-s", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {arm} server exited with {proc.returncode}: see {log.name}")
        info = server_status(run_id, home)
        if info and info["pid"] == proc.pid and _ready(info["url"], info["api_key"]):
            return proc.pid, info["url"], proc
        time.sleep(0.5)
    raise RuntimeError(f"the {arm} server was not ready within 600 s")


def _ready(url: str, key: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(pid: int, proc: Any, timeout: float = 60) -> int | None:
    """SIGTERM a server and reap it: its exit code (None if it had to be killed)."""
    os.kill(pid, signal.SIGTERM)
    return _reap(pid, proc, timeout)


def _reap(pid: int, proc: Any, timeout: float = 60) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            code = proc.poll()
            if code is not None:
                return code
        else:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (subprocess's own clean-up): the code is gone
                return None
            if done:
                return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return None


def _rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _one_server(arm: str, run_id: str, home: Path, key: str, texts: list[str], args: argparse.Namespace
                ) -> dict[str, Any]:
    pid, url, proc = _start(arm, run_id, home)
    try:
        rss = [_rss_mb(pid)]
        warm = asyncio.run(_load(url, key, texts, args.clients, args.warmup, client_kind=args.client))
        rss.append(_rss_mb(pid))
        load_before = os.getloadavg()[0]
        result = asyncio.run(_load(url, key, texts, args.clients, args.requests, client_kind=args.client))
        rss.append(_rss_mb(pid))
        result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        time.sleep(SETTLE_S)  # the batcher hands freed memory back after a quiet second
        rss.append(_rss_mb(pid))
        result["warmup_status"] = warm["status"]
        result["rss_mb"] = {"ready": rss[0], "after_warmup": rss[1], "after_load": rss[2], "settled": rss[3],
                            "growth_after_warmup": round(rss[3] - rss[1], 1)}
        if arm == "wait" and args.retrying:
            result["retrying"] = asyncio.run(_load_raw(url, key, texts, args.clients, args.requests, retry=True))
            time.sleep(SETTLE_S)
            result["rss_mb"]["after_retrying"] = _rss_mb(pid)
    finally:
        result_code = _stop(pid, proc)
    result["exit_code"] = result_code
    return result


def _drain_check(run_id: str, home: Path, key: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """SIGTERM `workbench serve` (as shipped: connections.DrainingServer) once `--requests`/8 answers came back,
    the clients still sending: what every request got, and the exit code."""
    pid, url, proc = _start("wait", run_id, home)

    def progress(done: int) -> None:
        if done == args.requests // 8:
            os.kill(pid, signal.SIGTERM)

    result = asyncio.run(_load(url, key, texts, args.clients, args.requests // 2, progress, args.client))
    result["exit_code"] = _reap(pid, proc)
    result["sigterm_after_answers"] = args.requests // 8
    return result


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        runs = [r[arm] for r in rounds if arm in r]

        def med(key: str) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return round(statistics.median(values), 1) if values else None

        out[arm] = {"accepted_p50_ms": med("accepted_p50_ms"), "accepted_p95_ms": med("accepted_p95_ms"),
                    "accepted_p99_ms": med("accepted_p99_ms"), "accepted_rps": med("accepted_rps"),
                    "accepted": sum(r["status"].get("200", 0) for r in runs),
                    "shed_503": sum(r["status"].get("503", 0) for r in runs),
                    "other_status": sum(v for r in runs for k, v in r["status"].items() if k not in ("200", "503")),
                    "lost": sum(r["lost"] for r in runs), "retry_after_missing": sum(r["retry_after_missing"] for r in runs),
                    "rss_growth_mb": [r["rss_mb"]["growth_after_warmup"] for r in runs],
                    "exit_codes": [r["exit_code"] for r in runs]}
    retrying = [r["wait"]["retrying"] for r in rounds if "retrying" in r.get("wait", {})]
    if retrying:
        out["wait_retrying"] = {
            "answered_200": sum(t["answered_200"] for t in retrying), "requests": sum(t["requests"] for t in retrying),
            "attempts": sum(t["attempts"] for t in retrying), "lost": sum(t["lost"] for t in retrying),
            **{key: round(statistics.median(t[key] for t in retrying), 1)
               for key in ("accepted_p95_ms", "end_to_end_p50_ms", "end_to_end_p95_ms", "accepted_rps", "wall_s")
               if all(t.get(key) is not None for t in retrying)}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--home", default=None, help="the workbench home holding the run (default: WORKBENCH_HOME)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--no-drain-check", action="store_true")
    p.add_argument("--no-retrying", dest="retrying", action="store_false",
                   help="skip the second load on the wait server, whose clients honour Retry-After")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="the load generator's HTTP client (raw: prepared bytes on asyncio streams, light)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args()

    from workbench.deploy.keys import ensure_api_key
    from workbench.deploy.runs import eval_split
    from workbench.store import RunStore

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    source = RunStore(args.home)
    with tempfile.TemporaryDirectory(prefix="bench_serve_load-") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(source.home, home, ignore=shutil.ignore_patterns("deploy", "serve"))
        store = RunStore(home)
        record = store.get(args.run)
        texts, _, _ = eval_split(record)
        key, _ = ensure_api_key(home)
        arms = [a for a in args.arms.split(",") if a]
        rounds: list[dict[str, Any]] = []
        for n in range(args.rounds):
            rounds.append({})
            for arm in (arms if n % 2 == 0 else arms[::-1]):  # interleaved, the order swapped each round
                r = _one_server(arm, record["id"], home, key, texts, args)
                rounds[-1][arm] = r
                say(f"round {n + 1} {arm:<5}: {r['status']} errors {r['errors']} accepted p50 {r['accepted_p50_ms']} "
                    f"p95 {r['accepted_p95_ms']} p99 {r['accepted_p99_ms']} ms, RSS {r['rss_mb']}, "
                    f"exit {r['exit_code']}, load {r['load_avg_1m']}")
                if "retrying" in r:
                    t = r["retrying"]
                    say(f"round {n + 1} wait, clients honouring Retry-After: {t['answered_200']} of {t['requests']} "
                        f"answered 200 in {t['attempts']} attempts, {t['wall_s']} s; per attempt p95 "
                        f"{t['accepted_p95_ms']} ms; first attempt to 200 p50 {t['end_to_end_p50_ms']} "
                        f"p95 {t['end_to_end_p95_ms']} ms; errors {t['errors']}")
        drain = None
        if not args.no_drain_check:
            drain = _drain_check(record["id"], home, key, texts, args)
            say(f"drain: {drain['status']} errors {drain['errors']} exit {drain['exit_code']}")
    out = {"run": record["id"], "requests": args.requests, "clients": args.clients, "warmup": args.warmup,
           "cpu_count": os.cpu_count(), "texts": len(texts), "rounds": rounds, "summary": _summary(rounds),
           "drain": drain}
    text = json.dumps(out, indent=None if args.json else 2)
    if args.out:
        tmp_out = Path(args.out).with_suffix(".json.tmp")
        tmp_out.write_text(text + "\n")
        os.replace(tmp_out, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
