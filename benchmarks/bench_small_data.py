"""The default recipe on small labelled sets: macro-F1 at a few label counts under variants of the small-data
defaults (the epoch cap, early-stopping patience, learning rate), beside the run's TF-IDF baseline.

A labelled set (default: the rotten-tomatoes catalog set) is shuffled once (--data-seed) and cut, as
bench_active.py does, into --test held-out rows and a --pool; for each seed and label count N, the first N
pool rows of a seeded shuffle (the same draw learning_curve starts from) are trained on with each variant:
the project's default classification recipe (MiniLM + LoRA, the run's own 20 % eval split choosing the
checkpoint, early stopping, the baseline / ensemble and the temperature), max_length 64, batch 16,
train.seed = the seed. Each variant sets the epoch cap of the data-size rule (defaults.MAX_EPOCHS) and any
train fields it names. Reported per run: the eval split's macro-F1 at the best checkpoint (what a variant is
chosen on), the held-out macro-F1 of the run's predictor and of its TF-IDF baseline alone (never used for
choosing), the epochs chosen, the best step, the steps trained and seconds.

Usage (JSON on stdout, progress on stderr):

    .venv/bin/python benchmarks/bench_small_data.py --labels 100,250 --seeds 0,1,2 --json-out r.json
    .venv/bin/python benchmarks/bench_small_data.py --variants cap10,cap40 --labels 100 --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name: (epoch cap of the data-size rule, whether the rule lengthens early stopping's patience by the
# evaluations in warmup, train fields set)
VARIANTS: dict[str, tuple[int, bool, dict[str, Any]]] = {
    "cap10": (10, False, {}),                                      # the rule before this benchmark
    "cap40": (40, False, {}),                                      # epochs up to the task's target steps
    "cap10-patience4": (10, False, {"early_stopping_patience": 4}),
    "cap40-patience4": (40, False, {"early_stopping_patience": 4}),
    "cap40-nostop": (40, False, {"early_stopping_patience": 0}),
    "cap40-lr5e-4": (40, False, {"learning_rate": 5e-4}),
    "rule": (40, True, {}),                                        # the default since: cap 40, patience waits out warmup
}


def log(msg: str) -> None:
    print(f"[bench_small_data {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_variant(name: str, labelled: list[dict[str, str]], test: tuple[list[str], list[str]], seed: int,
                args: argparse.Namespace, folder: Path, store: Any) -> dict[str, Any]:
    from sklearn.metrics import f1_score

    from workbench.active import _train_point
    from workbench.classical import ClassicalModel
    from workbench.config import Config
    from workbench.loop import defaults

    cap, warmup_aware, train = VARIANTS[name]
    config = Config.from_dict({
        "model": args.model, "data": {"source": "unused.csv"}, "method": {"name": "lora"},
        "train": {"batch_size": 16, "max_length": 64, "threads": args.threads, **train},
        "track": {"wandb": "disabled", "tensorboard": False}})
    # read when the run chooses its epochs (and patience)
    with mock.patch.object(defaults, "MAX_EPOCHS", cap), (contextlib.nullcontext() if warmup_aware else
                                                          mock.patch.object(defaults, "evaluations_in_warmup",
                                                                            lambda *_: 0)):
        point, _ = _train_point(config, labelled, folder / f"{name}-{len(labelled)}-{seed}.csv", test, seed, store)
    record = store.get(point["run"])
    run_dir = Path(record["dir"])
    baseline = ClassicalModel.load(run_dir / "classical")
    guessed = [baseline.labels[int(i)] for i in baseline.probabilities(test[0]).argmax(axis=1)]
    metrics, chosen = record.get("metrics") or {}, record.get("config") or {}
    decisions = [d for d in (record.get("info") or {}).get("decisions", []) if d["field"] == "train.epochs"]
    return {"variant": name, "labels": len(labelled), "seed": seed, "test_f1_macro": round(point["f1_macro"], 4),
            "eval_f1_macro": round(point["eval_f1_macro"], 4),
            "baseline_test_f1_macro": round(float(f1_score(test[1], guessed, average="macro")), 4),
            "baseline_eval_f1_macro": round((metrics.get("baseline") or {}).get("f1_macro", float("nan")), 4),
            "answers_with": (metrics.get("answers_with") or {}).get("by"),
            "epochs": chosen.get("train", {}).get("epochs"),
            "patience": chosen.get("train", {}).get("early_stopping_patience"), "best_step": point["best_step"],
            "steps": max((int(f.stem.split("-")[1]) for f in (run_dir / "eval").glob("step-*.json")), default=None),
            "epochs_why": decisions[0]["why"] if decisions else None, "seconds": point["seconds"], "run": point["run"]}


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean per variant and label count over the seeds."""
    out: dict[str, Any] = {}
    for p in points:
        out.setdefault(str(p["labels"]), {}).setdefault(p["variant"], []).append(p)
    return {n: {v: {k: round(sum(p[k] for p in ps) / len(ps), 4) for k in
                    ("eval_f1_macro", "test_f1_macro", "baseline_test_f1_macro", "seconds")} | {"seeds": len(ps)}
                for v, ps in by.items()} for n, by in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--pool", type=int, default=600)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--test-file", default=None, help="a labelled test file (else --test rows of --data)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", default="100,250")
    parser.add_argument("--variants", default="cap10,cap40,cap10-patience4,cap40-patience4,cap40-nostop")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from bench_active import split_data
    from workbench.data import load_labelled
    from workbench.store import RunStore

    folder = Path(tempfile.mkdtemp(prefix="bench-small-"))
    pool, test_path = split_data(args, folder)
    test_texts, test_labels, _ = load_labelled(str(test_path))
    store = RunStore(folder / "home")
    result: dict[str, Any] = {"bench": "small_data", "data": args.data, "pool": len(pool), "test": len(test_texts),
                              "variants": {v: {"max_epochs": VARIANTS[v][0], "patience_waits_out_warmup":
                                               VARIANTS[v][1], "train": VARIANTS[v][2]}
                                           for v in args.variants.split(",")}, "points": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        for n in [int(x) for x in args.labels.split(",")]:
            labelled = [pool[i] for i in order[:n]]
            for name in args.variants.split(","):  # interleaved: each seed and size runs every variant
                point = run_variant(name, labelled, (test_texts, test_labels), seed, args, folder, store)
                log(f"seed {seed} {n} labels {name}: eval {point['eval_f1_macro']:.4f} test {point['test_f1_macro']:.4f}"
                    f" (baseline {point['baseline_test_f1_macro']:.4f}) epochs {point['epochs']} best step "
                    f"{point['best_step']} {point['seconds']} s")
                result["points"].append(point)
                result["summary"] = summarise(result["points"])
                if args.json_out:
                    Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
