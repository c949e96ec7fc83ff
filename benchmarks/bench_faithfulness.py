"""Faithfulness of token attributions on a trained classification run: ERASER comprehensiveness.

    WORKBENCH_HOME=/work/trust-runs .venv/bin/python benchmarks/bench_faithfulness.py [RUN] [--n 50] [--k 5]
        [--variants ig-16,ig-32,ig-64,ig-mask-32,occlusion]

First `workbench.explain.faithfulness(RUN)` with its defaults (Integrated Gradients, 32 steps, pad baseline,
word-level attributions), which writes the run's trust/faithfulness.json; then each variant on the same
texts (the same seeded draw of `n` held-out texts with more than k words), without writing: Integrated
Gradients with 16 / 32 / 64 steps, a [MASK] baseline instead of [PAD], word pieces instead of words, words
with a letter or digit only (punctuation is neither deleted at random nor among the top k: a stricter random
baseline), and occlusion (each word's attribution the probability drop when it alone is deleted). For each: the mean drop
of the predicted class's probability when the k words of highest attribution are deleted, the mean drop
when k random words are (10 draws per text), their ratio (the goal: at least 2), the share of texts where
the top-k deletion drops more, the mean |convergence delta| for IG, and seconds per explanation (1 torch
thread). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("ig-16", "ig-32", "ig-64", "ig-mask-32", "ig-pieces-32", "ig-alnum-32", "occlusion")


def chosen_texts(predictor: Any, texts: list[str], k: int, n: int, seed: int) -> list[str]:
    """The texts `faithfulness` draws: seeded order, more than k words, the first n."""
    from workbench.explain import explained_target, text_words

    rng = np.random.default_rng(seed)
    tokenizer = getattr(explained_target(predictor).predictor, "tokenizer", None)
    return [texts[i] for i in rng.permutation(len(texts)) if len(text_words(tokenizer, texts[i])) > k][:n]


def run_variant(name: str, predictor: Any, texts: list[str], k: int, seed: int) -> dict[str, Any]:
    import workbench.explain as ex

    method = "occlusion" if name == "occlusion" else "integrated-gradients"
    steps = int(name.rsplit("-", 1)[1]) if name != "occlusion" else 32
    target = ex.explained_target(predictor, method)
    saved_baseline = ex.baseline_id
    if "mask" in name:
        ex.baseline_id = lambda tok: tok.mask_token_id  # the [MASK] token instead of [PAD]
    try:
        started = time.perf_counter()
        if "pieces" in name:
            explanations = piece_explanations(ex, target, texts, steps)
        else:
            explanations = ex.explain_predictor(predictor, texts, method=method, steps=steps)
        if "alnum" in name:
            explanations = [{**e, "tokens": [t for t in e["tokens"] if any(c.isalnum() for c in t["token"])]}
                            for e in explanations]
        seconds = (time.perf_counter() - started) / len(texts)
    finally:
        ex.baseline_id = saved_baseline
    figures = ex.comprehensiveness(target, explanations, k, ex.RANDOM_DRAWS, np.random.default_rng(seed))
    figures.pop("examples")
    deltas = [abs(e["convergence_delta"]) for e in explanations if e.get("convergence_delta") is not None]
    return {**figures, "seconds_per_text": round(seconds, 4),
            "mean_abs_convergence_delta": float(np.mean(deltas)) if deltas else None,
            "tokens_per_text": float(np.mean([len(e["tokens"]) for e in explanations]))}


def piece_explanations(ex: Any, target: Any, texts: list[str], steps: int) -> list[dict[str, Any]]:
    """Integrated Gradients with every word piece its own token (pieces not summed into words)."""
    saved = ex.aligned_pieces

    def one_word_per_piece(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int, int, int]]:
        return [(pos, i, s, e) for i, (pos, _, s, e) in enumerate(saved(tokenizer, text, ids))]

    ex.aligned_pieces = one_word_per_piece
    try:
        return [ex.explain_predictor(target.predictor, [t], method="integrated-gradients", steps=steps)[0]
                for t in texts]
    finally:
        ex.aligned_pieces = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="latest")
    parser.add_argument("--home", default=None)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-report", action="store_true", help="leave the run's faithfulness.json as it is")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from workbench.deploy.runs import eval_split
    from workbench.explain import faithfulness
    from workbench.predict import load_predictor
    from workbench.store import RunStore

    record = RunStore(args.home).get(args.run)
    report = None
    if not args.no_report:
        report = faithfulness(record["id"], home=args.home, k=args.k, n=args.n, seed=args.seed)
        report.pop("examples")
    predictor = load_predictor(record["id"], args.home)
    texts = chosen_texts(predictor, eval_split(record)[0], args.k, args.n, args.seed)
    variants = {}
    for name in [v for v in args.variants.split(",") if v]:
        variants[name] = run_variant(name, predictor, texts, args.k, args.seed)
        print(json.dumps({name: variants[name]}), file=sys.stderr, flush=True)
    print(json.dumps({"run": record["id"], "k": args.k, "n": len(texts), "threads": args.threads,
                      "report": report, "variants": variants}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
