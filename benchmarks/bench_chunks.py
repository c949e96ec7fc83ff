"""train.truncation on long texts: chunks (the whole text, its chunks' probabilities averaged) against head+tail
and head, through the CLI.

The set is the catalog's bbc-news (long articles, 5 topics) as `benchmarks/messy_data.py` builds it: a training
file and a disjoint test file. Each arm is `python -m workbench train` with a config that sets task, model
(minilm-l6), the data columns, data.max_train_samples, train.max_length, train.epochs and train.truncation, with
train.ensemble off (so the test figure is the fine-tuned model's, not its average with the TF-IDF baseline);
then `python -m workbench predict RUN --file TEST --text-column text --json` on a seeded, stratified sample of
the test file, scored with sklearn (bench_baselines.run_default does both). Seconds are the run's own
(train, wall) and the predict process's. The arms run one after another on the same machine; the load average
is recorded before each, since a shared machine slows every arm differently.

Usage (from the repository root; JSON on stdout, progress on stderr):

    .venv/bin/python benchmarks/bench_chunks.py --train-rows 300 --test-rows 200 --epochs 1 --threads 2
    .venv/bin/python benchmarks/bench_chunks.py --ref HEAD --patch fix.diff     # a commit, a patch applied on it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_baselines  # noqa: E402
import messy_data  # noqa: E402

ARMS = ("chunks", "head+tail", "head")
SET = "bbc-news"


def log(msg: str) -> None:
    print(f"[bench_chunks {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def test_sample(built: messy_data.BuiltSet, rows: int, seed: int, out: Path) -> tuple[Path, list[str], list[str]]:
    """A seeded, stratified sample of `rows` rows of the test file, written as a CSV (text, label)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    texts, labels = messy_data.read_test(built)
    if rows < len(texts):
        texts, _, labels, _ = train_test_split(texts, labels, train_size=rows, stratify=labels, random_state=seed)
    path = out / "test-sample.csv"
    pd.DataFrame({built.text_column: texts, built.label_column: labels}).to_csv(path, index=False)
    return path, list(texts), list(labels)


def token_lengths(texts: list[str]) -> dict[str, Any]:
    """The test texts' token counts under the MiniLM tokenizer (special tokens included)."""
    import numpy as np

    from workbench.catalog import resolve_model
    from workbench.models.loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("minilm-l6", None, False), False)
    n = np.asarray([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    return {"median": int(np.median(n)), "p90": int(np.percentile(n, 90)), "max": int(n.max())}


def source_tree(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """The workbench the arms run: the working tree, or commit --ref exported with --patch applied."""
    if not args.ref:
        return ROOT, bench_baselines.commit_id()
    dest = bench_baselines.snapshot(args.ref, out)
    about = bench_baselines.commit_id(args.ref)
    if args.patch:
        patched = out / f"_src-{about['commit'][:12]}-patched"
        subprocess.run(["rm", "-rf", str(patched)], check=True)
        subprocess.run(["cp", "-r", str(dest), str(patched)], check=True)
        subprocess.run(["git", "apply", str(Path(args.patch).resolve())], cwd=patched, check=True)
        about["patch"] = Path(args.patch).read_text()
        dest = patched
    return dest, about


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--train-rows", type=int, default=300, help="data.max_train_samples")
    parser.add_argument("--test-rows", type=int, default=200, help="test texts predicted (a stratified sample)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workbench runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set's split and the test sample")
    parser.add_argument("--out", default="/tmp/wb-bench-chunks", help="data, runs and snapshots go here")
    parser.add_argument("--ref", default=None, help="run the workbench of this commit (exported) instead")
    parser.add_argument("--patch", default=None, help="with --ref: a git diff applied to the exported commit")
    parser.add_argument("--json-out", default=None, help="also write the JSON here (rewritten after every arm)")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir()
                        else sys.executable)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src, about = source_tree(args, out)
    built = messy_data.build_set(SET, out / "data", seed=args.seed)
    test_path, texts, y_true = test_sample(built, args.test_rows, args.seed, out)
    sample = dataclasses.replace(built, test_path=str(test_path), test_rows=len(texts))
    result: dict[str, Any] = {
        "benchmark": "bench_chunks", "workbench": about, "set": built.as_dict(), "test_sample_rows": len(texts),
        "test_tokens": token_lengths(texts), "settings": {k: getattr(args, k) for k in (
            "train_rows", "epochs", "max_length", "threads", "seed")}, "arms": {}}
    run_args = argparse.Namespace(threads=args.threads, quick=False, python=args.python, src=str(src))
    for arm in args.arms.split(","):
        cfg = bench_baselines.recipe_config(built, args.train_rows)
        cfg["train"] = {"max_length": args.max_length, "epochs": args.epochs, "truncation": arm, "ensemble": "off"}
        work = out / arm.replace("+", "-")
        work.mkdir(exist_ok=True)
        load = list(os.getloadavg())
        log(f"{arm}: training ({args.train_rows} rows, {args.epochs} epoch(s), max_length {args.max_length})")
        measured, _ = bench_baselines.run_default(sample, cfg, work, out / "home", run_args, texts, y_true)
        measured["load_average_before"] = [round(x, 2) for x in load]
        result["arms"][arm] = measured
        log(f"{arm}: {bench_baselines.summary(measured)}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
