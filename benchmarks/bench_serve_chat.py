"""Chat tokens per second of a real `workbench serve` process: answers generated together, or one at a time.

    .venv/bin/python benchmarks/bench_serve_chat.py --home HOME [RUN] [--clients 1,4,8,16] [--rounds 2]
        [--max-tokens 32] [--requests-per-client 2] [--threads 1] [--out FILE] [--json]

Without RUN, a chat run of the packaged SmolLM2-135M-Instruct is trained in HOME first (LoRA, 1 epoch on 24
chatterbot conversations: a real run, small enough for a shared CPU; `--make-run` only makes it).

Two arms, each a fresh `workbench serve` process on a free loopback port (the serve command line with
--max-generation-batch, run by this file with request_timeout_s raised: the serve command has no option for
it), interleaved round by round
(the order swapped each round: a machine shared with other work slows both alike):
- "batched": concurrent chat requests share decode steps (max_generation_batch 16, the default);
- "one": answers one at a time (max_generation_batch=1).
Both arms get request_timeout_s=900 (at the default 60 s, 16 clients served one at a time on this shared CPU
were answered 504).

Per arm and number of concurrent clients: every client sends `--requests-per-client` chat requests one after
the other (the same prompts in the same order in both arms, greedy, `max_tokens` each, no streaming);
tokens/s = the completion tokens of all answers / the wall time. The answers of the two arms are compared
(greedy answers must be equal). Then 8 clients stream at once: time to first token and to the last, per client.
Prints one JSON object (medians over rounds under "summary"); `--out` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARMS = ("batched", "one")
PROMPTS = ["Write a short story about a dragon who learns to read.", "Explain how a bicycle works, step by step.",
           "Describe a walk through a forest in autumn.", "Write a letter to a friend about your summer holiday.",
           "Explain why the sky is blue to a ten-year-old.", "Describe how to bake bread at home.",
           "Write a poem about the sea and the moon.", "Tell me about the history of the printing press."]
# Requests that ask for a paragraph, as chat users mostly do: with one-line questions ("What is the capital of
# France?") smollm2 answers in about 11 tokens, and the prompt pass (about 40 tokens with its template's system
# prompt) then dominates both arms.


def make_run(home: Path) -> str:
    """A short LoRA chat run of smollm2-135m-instruct on chatterbot conversations; its id."""
    from workbench.config import Config
    from workbench.loop import train
    from workbench.store import RunStore

    config = Config.from_dict({
        "task": "chat", "model": "smollm2-135m-instruct", "name": "bench-serve-chat",
        "data": {"source": "chatterbot", "max_train_samples": 24, "max_eval_samples": 4},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 64, "early_stopping_patience": 0},
        "chat": {"max_new_tokens": 32, "sample_prompts": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    record = train(config, store=RunStore(home))
    if record["status"] != "completed":
        raise RuntimeError(f"the chat run failed: {record.get('error')}")
    return record["id"]


ARM_BATCH = {"batched": 16, "one": 1}


def _serve_with(batch: int, argv: list[str]) -> int:
    """`workbench serve ARGV...` with max_generation_batch=`batch` and request_timeout_s=900."""
    from dataclasses import dataclass

    import workbench.deploy.app as app_module
    from workbench.cli import main as cli_main

    @dataclass
    class BenchSettings(app_module.ServeSettings):
        max_generation_batch: int = batch
        request_timeout_s: float = 900.0

    app_module.ServeSettings = BenchSettings  # the serve command reads the module's name when it runs
    return cli_main(argv)


def _start(arm: str, run_id: str, home: Path) -> tuple[str, str, Any]:
    """A server of this arm: (url, key, its Popen)."""
    import httpx

    from workbench.deploy.server import server_status

    log = open(home / f"bench_serve_chat-{arm}.log", "ab")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-with", str(ARM_BATCH[arm]), "--home", str(home),
           "serve", run_id, "--max-generation-batch", str(ARM_BATCH[arm])]  # the option wins over the default
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {arm} server exited with {proc.returncode}: see {log.name}")
        info = server_status(run_id, home)
        if info and info["pid"] == proc.pid:
            try:
                r = httpx.get(info["url"] + "/readyz", headers={"Authorization": f"Bearer {info['api_key']}"})
                if r.status_code == 200:
                    return info["url"], info["api_key"], proc
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"the {arm} server was not ready within 900 s")


async def _load(url: str, key: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """`clients` clients, each sending `per_client` chat requests in turn; tokens, wall time and answers."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    answers: dict[int, str] = {}
    tokens = [0]

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for n in range(per_client):
            i = c * per_client + n
            r = await http.post(url + "/v1/chat/completions", headers=headers, json={
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                "temperature": 0})
            r.raise_for_status()
            body = r.json()
            tokens[0] += body["usage"]["completion_tokens"]
            answers[i] = body["choices"][0]["message"]["content"]

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(clients)])
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * per_client, "completion_tokens": tokens[0],
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "answers": [answers[i] for i in sorted(answers)]}


async def _streams(url: str, key: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """`clients` streamed chat requests at once: per client, seconds to the first content token and to the end."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}

    async def one(c: int, http: httpx.AsyncClient) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, pieces = None, 0
        async with http.stream("POST", url + "/v1/chat/completions", headers=headers, json={
                "messages": [{"role": "user", "content": PROMPTS[c % len(PROMPTS)]}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    pieces += 1
                    first = first if first is not None else time.perf_counter() - start
        return first or float("nan"), time.perf_counter() - start, pieces

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as http:
        got = await asyncio.gather(*[one(c, http) for c in range(clients)])
    firsts = sorted(g[0] for g in got)
    return {"clients": clients, "ttft_s": [round(g[0], 3) for g in got], "total_s": [round(g[1], 3) for g in got],
            "pieces": [g[2] for g in got], "ttft_median_s": round(statistics.median(firsts), 3),
            "ttft_max_s": round(firsts[-1], 3)}


def _one_server(arm: str, run_id: str, home: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from workbench.deploy.server import stop_server

    url, key, proc = _start(arm, run_id, home)
    try:
        asyncio.run(_load(url, key, 2, 1, args.max_tokens))  # warm-up
        levels = []
        for clients in args.clients:
            result = asyncio.run(_load(url, key, clients, args.requests_per_client, args.max_tokens))
            say(f"  {arm:<7} {clients:>2} clients: {result['tokens_per_s']:8.2f} tokens/s "
                f"({result['completion_tokens']} tokens in {result['wall_s']} s)")
            levels.append(result)
        streams = asyncio.run(_streams(url, key, args.stream_clients, args.max_tokens))
        say(f"  {arm:<7} {args.stream_clients} streams: first token median {streams['ttft_median_s']} s, "
            f"max {streams['ttft_max_s']} s")
    finally:
        stop_server(run_id, home, timeout=120)
        proc.wait(timeout=120)
    return {"levels": levels, "streams": streams, "load_avg_1m": round(os.getloadavg()[0], 2)}


def _summary(rounds: list[dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        if not all(arm in r for r in rounds):
            continue
        out[arm] = {str(c): statistics.median(r[arm]["levels"][i]["tokens_per_s"] for r in rounds)
                    for i, c in enumerate(clients)}
        out[arm]["stream_ttft_median_s"] = statistics.median(r[arm]["streams"]["ttft_median_s"] for r in rounds)
        out[arm]["stream_ttft_max_s"] = statistics.median(r[arm]["streams"]["ttft_max_s"] for r in rounds)
    if "batched" in out and "one" in out:
        out["speedup"] = {str(c): round(out["batched"][str(c)] / out["one"][str(c)], 2) for c in clients}
        out["greedy_answers_equal"] = all(
            r["batched"]["levels"][i]["answers"] == r["one"]["levels"][i]["answers"]
            for r in rounds for i in range(len(clients)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default=None, help="a chat run in HOME (default: train one)")
    p.add_argument("--home", required=True, help="the workbench home (the run's, or where one is trained)")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stream-clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of both servers (OMP_NUM_THREADS; on a shared 2-core machine 2 threads "
                        "collapsed under load)")
    p.add_argument("--make-run", action="store_true", help="only train the chat run and print its id")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    home = Path(args.home)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    run_id = args.run or make_run(home)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both arms' server processes inherit it
    if args.make_run:
        print(run_id)
        return 0
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        rounds.append({})
        for arm in (ARMS if n % 2 == 0 else ARMS[::-1]):  # interleaved, the order swapped each round
            say(f"round {n + 1}, {arm}:")
            rounds[-1][arm] = _one_server(arm, run_id, home, args, say)
    out = {"run": run_id, "model": "smollm2-135m-instruct", "max_tokens": args.max_tokens,
           "requests_per_client": args.requests_per_client, "clients": args.clients, "cpu_count": os.cpu_count(),
           "torch_threads": args.threads, "rounds": rounds, "summary": _summary(rounds, args.clients)}
    text = json.dumps(out, indent=None if args.json else 2)
    if args.out:
        tmp_out = Path(args.out).with_suffix(".json.tmp")
        tmp_out.write_text(text + "\n")
        os.replace(tmp_out, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-with":
        raise SystemExit(_serve_with(int(sys.argv[2]), sys.argv[3:]))
    raise SystemExit(main())
