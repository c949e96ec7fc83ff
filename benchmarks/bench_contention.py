"""Training when the cores are shared: OpenMP's wait policy alone and with a second run beside it.

Notebooks and dashboards on a course laptop rarely have the CPU to themselves. This runs the same short
training (`workbench train`, course size: MiniLM LoRA on 240 bbc-news rows, 64 tokens, 1 epoch) as
fresh processes, alone and two at once, under each OpenMP wait policy (`default`: OMP_WAIT_POLICY unset;
`PASSIVE`: waiting threads sleep instead of spinning), interleaved, and reports the median wall seconds of
each (policy, situation). One JSON object goes to stdout; progress to stderr.

    .venv/bin/python benchmarks/bench_contention.py --repeats 2

The wall time of a process includes its start (imports, model load), as a user waits for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("default", "PASSIVE")


def write_config(path: Path, train_samples: int, max_length: int) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
    import course

    config = course.config("contention", train={"epochs": 1, "max_length": max_length},
                           data={"max_train_samples": train_samples})
    config.save(path)


def start(config: Path, home: Path, policy: str) -> subprocess.Popen:
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WANDB_MODE": "disabled"}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return subprocess.Popen([sys.executable, "-m", "workbench", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(config: Path, home: Path, policy: str, together: int) -> list[float]:
    """Wall seconds of `together` identical runs started at once."""
    t0 = time.perf_counter()
    procs = [start(config, home, policy) for _ in range(together)]
    out = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a training run failed (policy {policy}); run it by hand to see why")
        out.append(round(time.perf_counter() - t0, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every case once")
    parser.add_argument("--train-samples", type=int, default=240)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    config = work / "config.yaml"
    write_config(config, args.train_samples, args.max_length)
    results: dict[str, list[float]] = {f"{p}/{s}": [] for p in POLICIES for s in ("alone", "pair")}
    for round_ in range(args.repeats):
        order = POLICIES if round_ % 2 == 0 else POLICIES[::-1]  # interleaved: drift hits both policies
        for policy in order:
            for situation, together in (("alone", 1), ("pair", 2)):
                print(f"round {round_ + 1}: {policy} {situation} ...", file=sys.stderr, flush=True)
                results[f"{policy}/{situation}"] += timed(config, work / "home", policy, together)
    medians = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "config": {"train_samples": args.train_samples, "max_length": args.max_length, "epochs": 1,
                   "model": "minilm-l6", "method": "lora", "cpus": os.cpu_count()},
        "wall_seconds": results,
        "median_wall_seconds": medians,
        "pair_slowdown": {p: round(medians[f"{p}/pair"] / medians[f"{p}/alone"], 2) for p in POLICIES},
        "passive_vs_default": {s: round(medians[f"PASSIVE/{s}"] / medians[f"default/{s}"], 2)
                               for s in ("alone", "pair")},
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
