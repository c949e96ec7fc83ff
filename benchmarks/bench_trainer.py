"""Our training loop (workbench.trainer.train) against transformers.Trainer on the same config.

Both sides get the same model (built by workbench.methods.build_model after the
same seed), the same split (workbench.data.prepare), the same tokenization
(truncation to max_length, dynamic padding by tokenizer.pad), the same batch
size, epochs, learning rate, warmup, linear schedule, weight decay, gradient
clipping, seed, torch AdamW, torch threads and example order. Each run is a
fresh subprocess; the runs alternate between the two sides and the report
gives medians, because this machine is shared and noisy.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_trainer.py               # default: LoRA, 400 train rows, 3 repeats
    .venv/bin/python benchmarks/bench_trainer.py --quick       # smoke test, ~1 minute
    .venv/bin/python benchmarks/bench_trainer.py --method full --repeats 5 --threads 1

One JSON object goes to stdout; progress goes to stderr. See benchmarks/README.md.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OURS, HF, CEILING = "workbench", "hf_trainer", "ceiling"


# --- configuration ------------------------------------------------------------------

def build_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The one workbench config both sides train."""
    from workbench.config import Config

    raw = {
        "model": args.model,
        "data": {"source": args.data, "max_train_samples": args.train_samples,
                 "max_eval_samples": args.eval_samples},
        "method": {"name": args.method, "target_modules": "auto"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                  "warmup_ratio": args.warmup_ratio, "scheduler": "linear", "weight_decay": 0.0,
                  "max_length": args.max_length, "gradient_accumulation": 1, "max_grad_norm": 1.0,
                  "eval_every": 0, "seed": args.seed, "precision": "fp32", "threads": args.threads,
                  "fast_dropout": not args.torch_dropout},
        # tracking must not count: no wandb, no TensorBoard (the run store itself is always on)
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    return Config.from_dict(raw).to_dict()  # validated, and with every default spelled out


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


# --- the CPU's ceiling: matmul peak and the FLOPs of one training sample ----------------------

def worker_ceiling(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Best fp32 matmul rate of this CPU at `threads`, and the FLOPs one training sample costs.

    The FLOPs are counted by torch.utils.flop_counter on one real forward + backward of the
    config's model at batch_size x max_length (matmuls and attention; dropout, softmax and the
    optimiser are not FLOPs to it), so achieved GFLOP/s = FLOPs per sample x samples/s, and
    its share of the matmul peak says how far the loop is from the hardware's ceiling.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates = []
    for _ in range(12):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9)

    from workbench.catalog import resolve_model
    from workbench.config import Config
    from workbench.methods import build_model
    from workbench.store import RunStore

    config = Config.from_dict(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as home:
        source = resolve_model(config.model, RunStore(home).home, False)
        built = build_model(config, source, ["a", "b", "c", "d", "e"], total_steps=10)
    model = built.model.train()
    rows, length = config.train.batch_size, config.train.max_length
    ids = torch.randint(1000, 20000, (rows, length))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(rows, dtype=torch.long)).loss.backward()
    return {"matmul_peak_gflops": round(max(rates), 1), "matmul_median_gflops": round(statistics.median(rates), 1),
            "train_gflop_per_sample": round(counter.get_total_flops() / rows / 1e9, 3),
            "flops_counted_at": f"{rows} x {length} tokens"}


# --- workers (each runs in its own process) ---------------------------------------------

class PhaseTimer:
    """Times the training phase the same way on both sides: from the train-begin hook to the
    last step-end hook (so per-step hooks and logging count, the final evaluation does not)."""

    def __init__(self) -> None:
        self.begin: float | None = None
        self.last_step_end: float | None = None
        self.cpu_begin = self.cpu_last = 0.0
        self.steps = 0

    def train_begin(self) -> None:
        self.begin = time.perf_counter()
        self.cpu_begin = time.process_time()

    def step_end(self) -> None:
        self.last_step_end = time.perf_counter()
        self.cpu_last = time.process_time()
        self.steps += 1

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the whole process (all threads) over the phase: less sensitive to other jobs
        than wall time, though OpenMP spin-waiting inflates it when threads are starved."""
        return self.cpu_last - self.cpu_begin

    @property
    def seconds(self) -> float:
        if self.begin is None or self.last_step_end is None:
            return float("nan")
        return self.last_step_end - self.begin


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def worker_ours(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from workbench.callbacks import Callback
    from workbench.config import Config
    from workbench.store import RunStore
    from workbench.trainer import train

    timer = PhaseTimer()

    class Timing(Callback):
        def on_train_begin(self, state, config):  # noqa: ANN001
            timer.train_begin()

        def on_step_end(self, state, control, loss, learning_rate, samples_per_second):  # noqa: ANN001
            timer.step_end()

    config = Config.from_dict(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="bench-wb-home-") as home:
        os.environ["WORKBENCH_HOME"] = home
        record = train(config, store=RunStore(home), callbacks=[Timing()])
    if record.get("status") != "completed":
        raise RuntimeError(f"workbench run ended {record.get('status')}: {record.get('error')}")
    timings, metrics = record["timings"], record["metrics"]
    info = record.get("info") or {}
    samples = info.get("train_rows", cfg_dict["data"]["max_train_samples"]) * cfg_dict["train"]["epochs"]
    return {
        "samples_per_second": timings["samples_per_second"],
        "train_seconds": timings["train_seconds"],
        "wall_seconds": timings["wall_seconds"],
        "accuracy": metrics["accuracy"],
        "train_samples": samples,
        "steps": timings["steps"],
        "phase_seconds": timer.seconds,
        "phase_samples_per_second": samples / timer.seconds,
        "phase_cpu_ms_per_sample": 1000 * timer.cpu_seconds / samples,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": info.get("trainable_params"),
    }


def worker_hf(cfg_dict: dict[str, Any], threads: int, same_order: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from torch.utils.data import Dataset, Sampler
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from workbench.catalog import resolve_model
    from workbench.config import Config
    from workbench.data import prepare
    from workbench.methods import build_model
    from workbench.trainer import epoch_order, set_seed

    wall_start = time.perf_counter()
    config = Config.from_dict(cfg_dict)
    t = config.train
    # exactly what workbench.trainer.train does before the loop: seed, data, seed again, model
    set_seed(t.seed)
    split = prepare(config.data, t.seed)
    with tempfile.TemporaryDirectory(prefix="bench-hf-home-") as home:
        source = resolve_model(config.model, Path(home), config.trust_remote_code)
        set_seed(t.seed)
        built = build_model(config, source, split.labels)
    model, tokenizer = built.model, built.tokenizer

    class Encoded(Dataset):
        def __init__(self, texts: list[str], labels: list[int]) -> None:
            enc = tokenizer(texts, truncation=True, max_length=t.max_length)
            self.rows = [{**{k: enc[k][i] for k in enc.keys()}, "labels": labels[i]} for i in range(len(texts))]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return self.rows[i]

    train_ds = Encoded(split.train_texts, split.train_labels)
    eval_ds = Encoded(split.eval_texts, split.eval_labels)

    class SameOrder(Sampler):
        """The workbench loop's example order (epoch_order(n, seed, epoch)), one epoch per __iter__."""

        def __init__(self, n: int, seed: int) -> None:
            self.n, self.seed, self.epoch, self.firsts = n, seed, 0, []

        def set_epoch(self, epoch: int) -> None:  # accelerate/Trainer may call it; our counter decides
            pass

        def __len__(self) -> int:
            return self.n

        def __iter__(self):  # noqa: ANN204
            order = epoch_order(self.n, self.seed, self.epoch)
            self.firsts.append(order[:4])
            self.epoch += 1
            return iter(order)

    sampler = SameOrder(len(train_ds), t.seed) if same_order else None

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    timer = PhaseTimer()

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            timer.train_begin()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            timer.step_end()

    with tempfile.TemporaryDirectory(prefix="bench-hf-out-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.effective_eval_batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=t.epochs,
            learning_rate=t.learning_rate,
            warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio: ceil(ratio * max_steps), as ours
            lr_scheduler_type="linear",
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim="adamw_torch",
            seed=t.seed,
            eval_strategy="no",  # evaluated once, after training, by predict() below
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,  # parity: our loop records loss and lr every step
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=True,
            label_names=["labels"],
        )
        trainer = OrderedTrainer(model=model, args=args, train_dataset=train_ds,
                                 data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Timing()])
        t0 = time.perf_counter()
        output = trainer.train()
        own_seconds = time.perf_counter() - t0
        pred = trainer.predict(eval_ds)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    accuracy = float((np.asarray(logits).argmax(-1) == np.asarray(split.eval_labels)).mean())
    samples = len(train_ds) * t.epochs
    runtime = output.metrics["train_runtime"]
    if same_order:
        expected = [epoch_order(len(train_ds), t.seed, e)[:4] for e in range(t.epochs)]
        if sampler.firsts != expected:
            raise RuntimeError(f"HF Trainer did not follow the workbench order: {sampler.firsts} vs {expected}")
    return {
        "samples_per_second": samples / runtime,
        "train_seconds": runtime,  # trainer.train() metrics['train_runtime']
        "train_seconds_own_clock": own_seconds,  # perf_counter around trainer.train()
        "wall_seconds": time.perf_counter() - wall_start,
        "accuracy": accuracy,
        "train_samples": samples,
        "steps": output.global_step,
        "phase_seconds": timer.seconds,
        "phase_samples_per_second": samples / timer.seconds,
        "phase_cpu_ms_per_sample": 1000 * timer.cpu_seconds / samples,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": built.trainable_params,
    }


def run_worker(kind: str, cfg_dict: dict[str, Any], threads: int, out: Path, same_order: bool) -> None:
    load_before = _load_average()
    if kind == CEILING:
        result = worker_ceiling(cfg_dict, threads)
    elif kind == OURS:
        result = worker_ours(cfg_dict, threads)
    else:
        result = worker_hf(cfg_dict, threads, same_order)
    result["load_average_before"] = load_before
    result["load_average_after"] = _load_average()
    out.write_text(json.dumps(result))


# --- the driver -----------------------------------------------------------------------

def schedule(repeats: int, order: str) -> list[str]:
    """abab: ours, HF, ours, HF, ...; abba: ours, HF, HF, ours, ... (cancels a linear drift in load)."""
    runs: list[str] = []
    for r in range(repeats):
        pair = [OURS, HF]
        if order == "abba" and r % 2 == 1:
            pair.reverse()
        runs += pair
    return runs


def run_one(kind: str, cfg_dict: dict[str, Any], args: argparse.Namespace, logs: Path, i: int) -> dict[str, Any]:
    out = logs / f"{i:02d}-{kind}.json"
    log = logs / f"{i:02d}-{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_config", json.dumps(cfg_dict),
           "--_out", str(out), "--threads", str(args.threads)]
    if args.hf_own_order:
        cmd.append("--hf-own-order")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=thread_env(args.threads), cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{kind} run {i} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["process_seconds"] = round(time.perf_counter() - start, 2)
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    sps = [round(r["samples_per_second"], 2) for r in results]
    acc = [r["accuracy"] for r in results]
    phase = [round(r["phase_samples_per_second"], 2) for r in results]
    cpu = [round(r["phase_cpu_ms_per_sample"], 2) for r in results]
    return {
        "samples_per_second": sps,
        "median": statistics.median(sps),
        "accuracy": acc,
        "median_accuracy": statistics.median(acc),
        "phase_samples_per_second": phase,
        "median_phase": statistics.median(phase),
        "phase_cpu_ms_per_sample": cpu,
        "median_phase_cpu_ms_per_sample": statistics.median(cpu),
        "train_seconds": [round(r["train_seconds"], 3) for r in results],
        "wall_seconds": [round(r["wall_seconds"], 2) for r in results],
        "load_average_before": [round(r["load_average_before"], 2) for r in results],
        "torch_threads": sorted({r["torch_threads"] for r in results}),
        "train_samples": results[0]["train_samples"],
        "steps": results[0]["steps"],
        "trainable_params": results[0]["trainable_params"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm-l6", help="catalog name or local model directory")
    p.add_argument("--data", default="bbc-news", help="catalog dataset or file")
    p.add_argument("--method", default="lora", choices=["full", "head-only", "lora", "qlora"])
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="runs per side; the report gives medians")
    p.add_argument("--threads", type=int, default=cpus, help="torch threads (and OMP/MKL) for both sides")
    p.add_argument("--order", choices=["abab", "abba"], default="abba",
                   help="abab: ours,HF,ours,HF...; abba: the pair order flips every repeat")
    p.add_argument("--hf-own-order", action="store_true",
                   help="let HF Trainer shuffle with its own sampler instead of the workbench's example order")
    p.add_argument("--torch-dropout", action="store_true",
                   help="our side uses torch's dropout too (train.fast_dropout: false), to see the loop alone")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 train / 64 eval rows, max_length 64, 1 repeat")
    p.add_argument("--logs", default=None, help="keep per-run logs and results in this directory")
    p.add_argument("--_worker", choices=[OURS, HF, CEILING], help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.train_samples, args.eval_samples, args.max_length, args.repeats = 64, 64, 64, 1
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        run_worker(args._worker, json.loads(args._config), args.threads, Path(args._out), not args.hf_own_order)
        return 0

    cfg_dict = build_config_dict(args)
    logs_ctx = None
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs_ctx = tempfile.TemporaryDirectory(prefix="bench-trainer-")
        logs = Path(logs_ctx.name)
    results: dict[str, list[dict[str, Any]]] = {OURS: [], HF: []}
    runs = schedule(args.repeats, args.order)
    try:
        for i, kind in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {kind} ...", file=sys.stderr, flush=True)
            r = run_one(kind, cfg_dict, args, logs, i)
            results[kind].append(r)
            print(f"[{i + 1}/{len(runs)}] {kind}: {r['samples_per_second']:.1f} samples/s "
                  f"(phase {r['phase_samples_per_second']:.1f}), accuracy {r['accuracy']:.4f}, "
                  f"load {r['load_average_before']:.2f}, {r['process_seconds']:.0f} s", file=sys.stderr, flush=True)
        print("ceiling: matmul peak and FLOPs per sample ...", file=sys.stderr, flush=True)
        ceiling = run_one(CEILING, cfg_dict, args, logs, len(runs))
    finally:
        if logs_ctx is not None:
            logs_ctx.cleanup()

    ours, hf = summarise(results[OURS]), summarise(results[HF])
    ratio = ours["median"] / hf["median"]
    gap = 100 * (ours["median_accuracy"] - hf["median_accuracy"])
    report = {
        "config": cfg_dict,
        "threads": args.threads,
        "repeats": args.repeats,
        "order": [k for k in runs],
        "measurement": {
            "workbench.samples_per_second": "record['timings']['samples_per_second']: samples / summed optimiser-step "
                                            "time (collate+forward+backward+clip+step; excludes per-step hooks)",
            "hf_trainer.samples_per_second": "train samples / trainer.train() metrics['train_runtime']",
            "phase_samples_per_second": "both sides the same way: train samples / (last step-end hook - train-begin "
                                        "hook), so per-step hooks and logging count and the final eval does not",
            "phase_cpu_ms_per_sample": "process CPU time (all threads) over that same span, per sample; "
                                       "cpu_ratio = HF / ours, so > 1 means ours used less CPU",
            "accuracy": "workbench: record['metrics']['accuracy']; HF: argmax of trainer.predict on the eval split",
            "example_order": "HF uses its own sampler" if args.hf_own_order else "HF follows the workbench order",
        },
        OURS: ours,
        HF: hf,
        "ratio": round(ratio, 4),
        "phase_ratio": round(ours["median_phase"] / hf["median_phase"], 4),
        "cpu_ratio": round(hf["median_phase_cpu_ms_per_sample"] / ours["median_phase_cpu_ms_per_sample"], 4),
        "accuracy_gap_points": round(gap, 2),
        "ceiling": {k: v for k, v in ceiling.items() if not k.startswith("load_average")},
        "achieved_gflops": {side: round(ceiling["train_gflop_per_sample"] * summary["median"], 1)
                            for side, summary in ((OURS, ours), (HF, hf))},
        "fraction_of_matmul_peak": {side: round(ceiling["train_gflop_per_sample"] * summary["median"]
                                                / ceiling["matmul_peak_gflops"], 3)
                                    for side, summary in ((OURS, ours), (HF, hf))},
        "meets_target": bool(ratio >= 1.0 and abs(gap) <= 1.0),
    }
    if max(ours["load_average_before"] + hf["load_average_before"]) > args.threads:
        report["warning"] = (f"the 1-minute load average reached {max(ours['load_average_before'] + hf['load_average_before'])}"
                             f" on {os.cpu_count()} CPUs: other jobs competed for the cores, so wall-clock numbers are "
                             "noisy; compare cpu_ratio, or rerun with --threads 1 / more --repeats")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
