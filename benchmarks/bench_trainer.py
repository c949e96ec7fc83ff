"""Our training loop (workbench.train) against transformers.Trainer on the same config, on CPU or CUDA.

Both sides get the same model (built by the workbench's own build_model after the same
seed), the same split (workbench.data.prepare), the same tokenization (truncation to
max_length, dynamic padding), batch size, epochs, learning rate, warmup, linear schedule,
weight decay, gradient clipping, seed, torch AdamW, torch threads and device. Each run is a
fresh subprocess; the runs rotate between the sides and the report gives medians, because
a shared machine is noisy. Our side is the public `workbench.train(config)`, so the report
follows whatever the loop does today.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_trainer.py                     # default: LoRA, 400 rows, 3 repeats
    .venv/bin/python benchmarks/bench_trainer.py --quick             # smoke test, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_trainer.py --precision fp32,bf16 --device cuda
    .venv/bin/python benchmarks/bench_trainer.py --steps             # one step: fp32 vs bf16 base vs autocast

One JSON object goes to stdout; progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OURS, HF = "workbench", "hf_trainer"
CEILING, STEPS = "ceiling", "steps"
PRECISIONS = ("fp32", "bf16", "auto")

# Where the loop's building blocks live, newest layout first. The HF side and the FLOP count need the
# workbench's own model builder (so both sides train the same model); our side needs only workbench.train.
LOCATIONS = {
    "build_model": ["workbench.models.classifier", "workbench.models", "workbench.methods"],
    "set_seed": ["workbench.models.state", "workbench.loop.trainer", "workbench.trainer"],
    "epoch_order": ["workbench.loop.trainer", "workbench.loop", "workbench.trainer"],
}


def locate(name: str) -> Callable[..., Any]:
    """The workbench function `name`, wherever the current layout keeps it."""
    for module in LOCATIONS[name]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise SystemExit(f"bench_trainer: {name} is in none of {', '.join(LOCATIONS[name])}: "
                     "add its new module to LOCATIONS in benchmarks/bench_trainer.py")


def side_name(kind: str, precision: str) -> str:
    return f"{kind}_{precision}"


# --- configuration ------------------------------------------------------------------

def build_config_dict(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """The one workbench config both sides train, at `precision`."""
    from workbench.config import Config

    raw = {
        "model": args.model,
        "data": {"source": args.data, "max_train_samples": args.train_samples,
                 "max_eval_samples": args.eval_samples},
        "method": {"name": args.method, "target_modules": "auto"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                  "warmup_ratio": args.warmup_ratio, "scheduler": "linear", "weight_decay": 0.0,
                  "max_length": args.max_length, "gradient_accumulation": 1, "max_grad_norm": 1.0,
                  "eval_every": 0, "seed": args.seed, "precision": precision, "threads": args.threads,
                  "fast_dropout": not args.torch_dropout, "length_bucketing": args.bucketing},
        # tracking must not count: no wandb, no TensorBoard (the run store itself is always on)
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    try:
        return Config.from_dict(raw).to_dict()  # validated, and with every default spelled out
    except ValueError as exc:
        raise SystemExit(f"bench_trainer: the workbench refuses this config: {exc}") from None


def thread_env(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our loop takes the GPU whenever it sees one
    return env


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_trainer: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}): use --device cpu or auto")
    return requested


def concrete_precision(precision: str, device: str) -> str:
    """What "auto" means on this device, for the HF side (which has no "auto")."""
    if precision != "auto":
        return precision
    from workbench.loop.precision import resolve_precision

    return resolve_precision("auto", device)


# --- timing shared by both sides -------------------------------------------------------

class PhaseTimer:
    """Times the training phase the same way on both sides: from the train-begin hook to the
    last step-end hook (so per-step hooks and logging count, the final evaluation does not).

    On CUDA the GPU is synchronised at the train-begin hook and at the last step only, so queued
    kernels count and no per-step synchronisation is added to either loop."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.begin: float | None = None
        self.last_step_end: float | None = None
        self.cpu_begin = self.cpu_last = 0.0
        self.steps = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def train_begin(self) -> None:
        self._sync()
        self.begin = time.perf_counter()
        self.cpu_begin = time.process_time()

    def step_end(self, step: int, max_steps: int) -> None:
        if step >= max_steps:
            self._sync()
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


def _peak_gpu_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


# --- workers (each runs in its own process) ---------------------------------------------

def worker_ours(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import workbench
    from workbench.data import prepare

    timer = PhaseTimer(torch.cuda.is_available())

    class Timing(workbench.Callback):
        def on_train_begin(self, state, config):  # noqa: ANN001
            timer.train_begin()

        def on_step_end(self, state, control, loss, learning_rate, samples_per_second):  # noqa: ANN001
            timer.step_end(state.global_step, state.max_steps)

    config = workbench.Config.from_dict(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="bench-wb-home-") as home:
        os.environ["WORKBENCH_HOME"] = home
        record = workbench.train(config, store=workbench.RunStore(home), callbacks=[Timing()])
        if record.get("status") != "completed":
            raise RuntimeError(f"workbench run ended {record.get('status')}: {record.get('error')}")
        peak_train = _peak_gpu_mb()
        # prediction speed: the run's own predictor over the eval texts (public API), after one warm-up batch
        split = prepare(config.data, config.train.seed)
        predictor = workbench.load_predictor(record["id"], home)
        if torch.cuda.is_available():
            predictor.model.to("cuda")
        batch = config.train.effective_eval_batch_size
        predictor.predict(split.eval_texts[:batch], batch_size=batch)
        start = time.perf_counter()
        predictor.predict(split.eval_texts, batch_size=batch)
        predict_seconds = time.perf_counter() - start
    timings, metrics = record["timings"], record["metrics"]
    info = record.get("info") or {}
    samples = info.get("train_rows", cfg_dict["data"]["max_train_samples"]) * cfg_dict["train"]["epochs"]
    eval_rows = info.get("eval_rows", len(split.eval_texts))
    evals = max(1, cfg_dict["train"]["epochs"])  # eval_every 0: one evaluation per epoch
    return {
        "samples_per_second": timings["samples_per_second"],
        "train_seconds": timings["train_seconds"],
        "wall_seconds": timings.get("wall_seconds"),
        "accuracy": metrics["accuracy"],
        "train_samples": samples,
        "steps": timings["steps"],
        "phase_seconds": timer.seconds,
        "phase_samples_per_second": samples / timer.seconds,
        "phase_cpu_ms_per_sample": 1000 * timer.cpu_seconds / samples,
        "eval_samples_per_second": round(eval_rows * evals / timings["eval_seconds"], 2)
        if timings.get("eval_seconds") else None,
        "predict_samples_per_second": round(len(split.eval_texts) / predict_seconds, 2),
        "peak_memory_mb": timings.get("peak_memory_mb") or peak_train,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": info.get("trainable_params"),
    }


def worker_hf(cfg_dict: dict[str, Any], threads: int, precision: str, same_order: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from torch.utils.data import Dataset, Sampler
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from workbench.catalog import resolve_model
    from workbench.config import Config
    from workbench.data import prepare

    build_model, set_seed = locate("build_model"), locate("set_seed")
    cuda = torch.cuda.is_available()
    wall_start = time.perf_counter()
    config = Config.from_dict(cfg_dict)
    t = config.train
    # what the workbench loop does before training: seed, data, seed again, model
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
    epoch_order = locate("epoch_order") if same_order else None

    class SameOrder(Sampler):
        """The workbench's plain shuffle (epoch_order(n, seed, epoch)), one epoch per __iter__."""

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

    timer = PhaseTimer(cuda)

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            timer.train_begin()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            timer.step_end(state.global_step, state.max_steps)

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
            bf16=precision == "bf16",  # HF's bf16: autocast around the forward
            eval_strategy="no",  # evaluated once, after training, by predict() below
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,  # parity: our loop records loss and lr every step
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            label_names=["labels"],
        )
        trainer = OrderedTrainer(model=model, args=args, train_dataset=train_ds,
                                 data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Timing()])
        t0 = time.perf_counter()
        output = trainer.train()
        own_seconds = time.perf_counter() - t0
        peak_train = _peak_gpu_mb()
        trainer.predict(Encoded(split.eval_texts[: t.effective_eval_batch_size],
                                split.eval_labels[: t.effective_eval_batch_size]))  # warm-up, as ours
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
        "eval_samples_per_second": round(pred.metrics["test_samples_per_second"], 2),
        "predict_samples_per_second": round(pred.metrics["test_samples_per_second"], 2),
        "peak_memory_mb": peak_train,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": built.trainable_params,
    }


# --- the device's ceiling: matmul peaks and the FLOPs of one training sample --------------

def matmul_peaks(device: str) -> dict[str, float]:
    """Best fp32 and bf16 matmul rates of `device` (GFLOP/s), square products timed after a warm-up.

    CPU: 2048^3 products at the process's thread count (bf16: 1024^3 where the CPU has no native bf16). CUDA: 8192^3 products between CUDA events;
    fp32 with TF32 off (what fp32 training uses unless told otherwise), TF32 reported apart."""
    import torch

    def rate(n: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: kernel choice, weight packing
        rates = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.mm(a, b)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                torch.mm(a, b)
                seconds = time.perf_counter() - t0
            rates.append(2 * n ** 3 / seconds / 1e9)
        return round(max(rates), 1), round(statistics.median(rates), 1)

    out: dict[str, float] = {}
    if device == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        out["fp32_gflops"], out["fp32_median_gflops"] = rate(8192, torch.float32, 10)
        torch.backends.cuda.matmul.allow_tf32 = True
        out["tf32_gflops"], _ = rate(8192, torch.float32, 10)
        torch.backends.cuda.matmul.allow_tf32 = previous
        out["bf16_gflops"], out["bf16_median_gflops"] = rate(8192, torch.bfloat16, 10)
    else:
        out["fp32_gflops"], out["fp32_median_gflops"] = rate(2048, torch.float32, 12)
        from workbench.loop.precision import cpu_has_bf16

        # without native bf16 a 2048^3 bf16 product takes seconds (converted element by element): 1024^3 says as much
        n = 2048 if cpu_has_bf16() else 1024
        out["bf16_gflops"], out["bf16_median_gflops"] = rate(n, torch.bfloat16, 6 if n == 2048 else 3)
    return out


def worker_ceiling(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Matmul peaks of this device, and the FLOPs one training sample costs.

    The FLOPs are counted by torch.utils.flop_counter on one real forward + backward of the
    config's model at batch_size x max_length (matmuls and attention; dropout, softmax and the
    optimiser are not FLOPs to it), so achieved GFLOP/s = FLOPs per sample x samples/s, and
    its share of a matmul peak says how far the loop is from the hardware's ceiling.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workbench.catalog import resolve_model
    from workbench.config import Config

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = matmul_peaks(device)
    config = Config.from_dict(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as home:
        source = resolve_model(config.model, Path(home), False)
        built = locate("build_model")(config, source, ["a", "b", "c", "d", "e"], total_steps=10)
    model = built.model.train()
    rows, length = config.train.batch_size, config.train.max_length
    ids = torch.randint(1000, 20000, (rows, length))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(rows, dtype=torch.long)).loss.backward()
    return {"device": device_description(device), "matmul_peak_gflops": peaks,
            "train_gflop_per_sample": round(counter.get_total_flops() / rows / 1e9, 3),
            "flops_counted_at": f"{rows} x {length} tokens"}


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    from workbench.loop.precision import cpu_bf16_flags

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                 "CPU")
    flags = cpu_bf16_flags() or ["no native bf16"]
    return (f"{model}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
            f"{' '.join(flags)} (torch {torch.__version__})")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


# --- one training step, variant against variant (--steps) ----------------------------------

def worker_steps(args: dict[str, Any], threads: int) -> dict[str, Any]:
    """Median ms of one LoRA training step of a MiniLM-sized BERT (built from a config: hidden 384,
    6 layers) per precision variant, interleaved: fp32; bf16 base (freeze_base_in_bf16); bf16 autocast
    over the fp32 model (what accelerate's mixed_precision and HF's bf16=True do). Optionally a
    torch.profiler table of one fp32 step."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from workbench.loop.precision import dtype_report, freeze_base_in_bf16

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                    num_attention_heads=12, intermediate_size=1536, num_labels=5))
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=r".*encoder.*\.(query|key|value|dense)$", modules_to_save=["classifier", "pooler"])
    base = get_peft_model(bert, lora).to(device).train()
    rows, length = args["batch_size"], args["max_length"]
    ids = torch.randint(1000, 20000, (rows, length), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 5, (rows,), device=device)}

    variants: dict[str, tuple[Any, bool]] = {}
    for name in args["variants"]:
        model = copy.deepcopy(base)
        if name == "bf16_base":
            freeze_base_in_bf16(model)
        variants[name] = (model, name == "autocast_bf16")
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, (m, _) in variants.items()}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step(name: str) -> float:
        model, autocast = variants[name]
        sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - start) * 1000

    for name in variants:  # warm-up: kernel choice, allocator, oneDNN primitives
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads = []
    for _ in range(args["rounds"]):
        loads.append(round(_load_average(), 2))
        for name in variants:
            for _ in range(args["steps_per_round"]):
                times[name].append(step(name))
    result: dict[str, Any] = {
        "device": device_description(device),
        "shape": f"batch {rows} x {length} tokens",
        "model": "BERT from config: hidden 384, 6 layers, 12 heads, ffn 1536 (MiniLM-L6 size); LoRA r=8 on every "
                 "encoder Linear, pooler + classifier trained, dropout 0.1",
        "median_ms": {name: round(statistics.median(v), 1) for name, v in times.items()},
        "all_ms": {name: [round(x, 1) for x in v] for name, v in times.items()},
        "load_average": loads,
        "dtypes": {name: dtype_report(m) for name, (m, _) in variants.items()},
    }
    if "fp32" in times:
        result["vs_fp32"] = {name: round(statistics.median(times["fp32"]) / statistics.median(v), 3)
                             for name, v in times.items()}
    if args.get("profile"):
        result["profile_fp32_step"] = profile_step(lambda: step(next(iter(variants))), device)
    if args.get("onednn") and device == "cpu":
        result["onednn_kernels"] = {name: onednn_kernels(lambda name=name: step(name)) for name in variants}
    return result


def onednn_kernels(run: Callable[[], Any]) -> dict[str, Any]:
    """The oneDNN primitives one step executes (kind and implementation, e.g. `matmul brg_matmul:avx512_core_amx`),
    read from oneDNN's verbose output; none at all means torch ran its own kernels (MKL or native)."""
    import collections

    import torch

    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)  # oneDNN prints from C, past Python's sys.stdout
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        lines = capture.read().splitlines()
    counts: collections.Counter[str] = collections.Counter()
    info = []
    for line in lines:
        parts = line.split(",")
        if not line.startswith("onednn_verbose"):
            continue
        if "exec" in parts and len(parts) > parts.index("exec") + 3:
            at = parts.index("exec")
            counts[f"{parts[at + 2]} {parts[at + 3]}"] += 1
        elif "info" in parts and any(k in line for k in ("isa:", "oneDNN v")):
            info.append(line.split("info,", 1)[-1])
    return {"executed": dict(counts.most_common(15)), "info": info[:4]}


def profile_step(run: Callable[[], float], device: str, top: int = 25) -> list[dict[str, Any]]:
    """torch.profiler over one step: the ops with the most self time (CPU, or CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1000, 2),
             "share": round(getattr(e, key, 0) / total, 3)} for e in events[:top]]


def run_worker(kind: str, payload: dict[str, Any], threads: int, out: Path) -> None:
    load_before = _load_average()
    if kind == CEILING:
        result = worker_ceiling(payload["config"], threads)
    elif kind == STEPS:
        result = worker_steps(payload, threads)
    elif kind.startswith(OURS):
        result = worker_ours(payload["config"], threads)
    else:
        result = worker_hf(payload["config"], threads, payload["precision"], payload["same_order"])
    result["load_average_before"] = load_before
    result["load_average_after"] = _load_average()
    out.write_text(json.dumps(result))


# --- the driver -----------------------------------------------------------------------

def schedule(sides: list[str], repeats: int, order: str) -> list[str]:
    """abab: the sides in one order every round; abba: the order reverses every other round, so each
    side runs early and late equally often (cancels a linear drift in load)."""
    runs: list[str] = []
    for r in range(repeats):
        runs += list(reversed(sides)) if order == "abba" and r % 2 == 1 else list(sides)
    return runs


def run_one(kind: str, payload: dict[str, Any], args: argparse.Namespace, logs: Path, i: int) -> dict[str, Any]:
    out = logs / f"{i:02d}-{kind}.json"
    log = logs / f"{i:02d}-{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_payload", json.dumps(payload),
           "--_out", str(out), "--threads", str(args.threads)]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=thread_env(args.threads, args.device),
                              cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{kind} run {i} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["process_seconds"] = round(time.perf_counter() - start, 2)
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str, digits: int = 2) -> list[Any]:
        return [round(r[key], digits) if isinstance(r.get(key), (int, float)) else r.get(key) for r in results]

    def median(key: str) -> float | None:
        found = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        return round(statistics.median(found), 4) if found else None

    return {
        "phase_samples_per_second": values("phase_samples_per_second"),
        "median_phase": median("phase_samples_per_second"),
        "samples_per_second_own_clock": values("samples_per_second"),
        "median_own_clock": median("samples_per_second"),
        "accuracy": [r["accuracy"] for r in results],
        "median_accuracy": median("accuracy"),
        "phase_cpu_ms_per_sample": values("phase_cpu_ms_per_sample"),
        "median_phase_cpu_ms_per_sample": median("phase_cpu_ms_per_sample"),
        "eval_samples_per_second": values("eval_samples_per_second"),
        "predict_samples_per_second": values("predict_samples_per_second"),
        "median_predict_samples_per_second": median("predict_samples_per_second"),
        "peak_memory_mb": values("peak_memory_mb", 1),
        "train_seconds": values("train_seconds", 3),
        "wall_seconds": values("wall_seconds"),
        "load_average_before": values("load_average_before"),
        "torch_threads": sorted({r["torch_threads"] for r in results}),
        "train_samples": results[0]["train_samples"],
        "steps": results[0]["steps"],
        "trainable_params": results[0]["trainable_params"],
    }


def compare(summaries: dict[str, dict[str, Any]], precisions: list[str], ceiling: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / HF per precision and best against best, accuracy gaps, and shares of the matmul peaks."""
    def ratio(a: str, b: str) -> dict[str, Any]:
        sa, sb = summaries[a], summaries[b]
        return {"ratio": round(sa["median_phase"] / sb["median_phase"], 4),
                "own_clock_ratio": round(sa["median_own_clock"] / sb["median_own_clock"], 4),
                "cpu_ratio": round(sb["median_phase_cpu_ms_per_sample"] / sa["median_phase_cpu_ms_per_sample"], 4),
                "accuracy_gap_points": round(100 * (sa["median_accuracy"] - sb["median_accuracy"]), 2)}

    out: dict[str, Any] = {"per_precision": {p: ratio(side_name(OURS, p), side_name(HF, p)) for p in precisions}}
    best_ours = max((s for s in summaries if s.startswith(OURS)), key=lambda s: summaries[s]["median_phase"])
    best_hf = max((s for s in summaries if s.startswith(HF)), key=lambda s: summaries[s]["median_phase"])
    out["best_vs_best"] = {"ours": best_ours, "hf": best_hf, **ratio(best_ours, best_hf)}
    out["meets_target_2x"] = bool(out["best_vs_best"]["ratio"] >= 2.0
                                  and abs(out["best_vs_best"]["accuracy_gap_points"]) <= 1.0)
    per_sample = ceiling["train_gflop_per_sample"]
    peaks = ceiling["matmul_peak_gflops"]
    out["achieved_gflops"] = {s: round(per_sample * summaries[s]["median_phase"], 1) for s in summaries}
    out["fraction_of_matmul_peak"] = {
        s: {"fp32": round(per_sample * summaries[s]["median_phase"] / peaks["fp32_gflops"], 3),
            "bf16": round(per_sample * summaries[s]["median_phase"] / peaks["bf16_gflops"], 3)}
        for s in summaries}
    return out


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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both sides train; auto: cuda when torch sees a GPU")
    p.add_argument("--precision", default="fp32",
                   help="comma list of fp32, bf16, auto: each trains our side (train.precision) and the HF side "
                        "(bf16=True for bf16; auto as resolved for this device)")
    p.add_argument("--no-hf-bf16", action="store_true",
                   help="leave out the extra HF run with bf16=True that is reported beside the others")
    p.add_argument("--repeats", type=int, default=3, help="runs per side; the report gives medians")
    p.add_argument("--threads", type=int, default=cpus, help="torch threads (and OMP/MKL) for every side")
    p.add_argument("--order", choices=["abab", "abba"], default="abba",
                   help="abab: the sides in one order every round; abba: the order reverses every other round")
    p.add_argument("--hf-same-order", action="store_true",
                   help="HF follows the workbench's plain shuffle (epoch_order) instead of its own RandomSampler; "
                        "only meaningful while our loop does not bucket batches by length")
    p.add_argument("--torch-dropout", action="store_true",
                   help="our side uses torch's dropout too (train.fast_dropout: false), to see the loop alone")
    p.add_argument("--bucketing", action="store_true",
                   help="our side batches rows of similar length together (train.length_bucketing: true)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 train / 64 eval rows, max_length 64, 1 repeat")
    p.add_argument("--steps", action="store_true",
                   help="instead of training runs: median ms of one LoRA step, fp32 vs bf16 base vs bf16 autocast")
    p.add_argument("--step-rounds", type=int, default=5, help="--steps: interleaved rounds")
    p.add_argument("--steps-per-round", type=int, default=2, help="--steps: steps per variant per round")
    p.add_argument("--step-variants", default="fp32,bf16_base,autocast_bf16", help="--steps: which variants")
    p.add_argument("--profile", action="store_true", help="--steps: add a torch.profiler table of one fp32 step")
    p.add_argument("--onednn", action="store_true",
                   help="--steps on CPU: list the oneDNN kernels one step of each variant runs (ONEDNN_VERBOSE)")
    p.add_argument("--logs", default=None, help="keep per-run logs and results in this directory")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_payload", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.train_samples, args.eval_samples, args.max_length, args.repeats = 64, 64, 64, 1
    if args.repeats < 1 or args.threads < 1 or args.step_rounds < 1 or args.steps_per_round < 1:
        p.error("--repeats, --threads, --step-rounds and --steps-per-round must be at least 1")
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad or not args.precisions:
        p.error(f"--precision {args.precision!r}: use a comma list of {', '.join(PRECISIONS)}")
    args.variants = [x.strip() for x in args.step_variants.split(",") if x.strip()]
    unknown = [v for v in args.variants if v not in ("fp32", "bf16_base", "autocast_bf16")]
    if unknown or not args.variants:
        p.error(f"--step-variants {args.step_variants!r}: use a comma list of fp32, bf16_base, autocast_bf16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        run_worker(args._worker, json.loads(args._payload), args.threads, Path(args._out))
        return 0
    args.device = pick_device(args.device)
    logs_ctx = None
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs_ctx = tempfile.TemporaryDirectory(prefix="bench-trainer-")
        logs = Path(logs_ctx.name)
    try:
        report = run_steps(args, logs) if args.steps else run_sides(args, logs)
    finally:
        if logs_ctx is not None:
            logs_ctx.cleanup()
    print(json.dumps(report, indent=2))
    return 0


def run_steps(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    payload = {"batch_size": args.batch_size, "max_length": args.max_length, "rounds": args.step_rounds,
               "steps_per_round": args.steps_per_round, "variants": args.variants, "profile": args.profile,
               "onednn": args.onednn}
    print(f"steps: {', '.join(args.variants)} on {args.device}, {args.step_rounds} rounds ...", file=sys.stderr,
          flush=True)
    result = run_one(STEPS, payload, args, logs, 0)
    result["threads"] = args.threads
    return result


def run_sides(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    # each side: (kind, precision as the config says it, precision the HF side uses)
    sides: dict[str, dict[str, Any]] = {}
    for p in args.precisions:
        cfg = build_config_dict(args, p)
        sides[side_name(OURS, p)] = {"config": cfg}
        sides[side_name(HF, p)] = {"config": cfg, "precision": concrete_precision(p, args.device),
                                   "same_order": args.hf_same_order}
    if not args.no_hf_bf16 and not any(s.get("precision") == "bf16" for s in sides.values()):
        sides[side_name(HF, "bf16")] = {"config": build_config_dict(args, "fp32"), "precision": "bf16",
                                        "same_order": args.hf_same_order}
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    runs = schedule(list(sides), args.repeats, args.order)
    for i, kind in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {kind} ...", file=sys.stderr, flush=True)
        r = run_one(kind, sides[kind], args, logs, i)
        results[kind].append(r)
        print(f"[{i + 1}/{len(runs)}] {kind}: {r['phase_samples_per_second']:.1f} samples/s "
              f"(own clock {r['samples_per_second']:.1f}), accuracy {r['accuracy']:.4f}, "
              f"load {r['load_average_before']:.2f}, {r['process_seconds']:.0f} s", file=sys.stderr, flush=True)
    print("ceiling: matmul peaks and FLOPs per sample ...", file=sys.stderr, flush=True)
    ceiling = run_one(CEILING, {"config": sides[runs[0]]["config"]}, args, logs, len(runs))

    summaries = {s: summarise(rs) for s, rs in results.items()}
    report: dict[str, Any] = {
        "device": ceiling["device"],
        "config": sides[runs[0]]["config"],
        "precisions": args.precisions,
        "threads": args.threads,
        "repeats": args.repeats,
        "order": runs,
        "measurement": {
            "phase_samples_per_second": "both sides the same way (used for every ratio): train samples / (last "
                                        "step-end hook - train-begin hook); per-step hooks and logging count, the "
                                        "final evaluation does not; on CUDA synchronised at both ends only",
            "samples_per_second_own_clock": "workbench: record['timings']['samples_per_second'] (its own step "
                                            "timer); HF: train samples / trainer.train() metrics['train_runtime']",
            "phase_cpu_ms_per_sample": "process CPU time (all threads) over the phase, per sample; "
                                       "cpu_ratio = HF / ours, so > 1 means ours used less CPU",
            "accuracy": "workbench: record['metrics']['accuracy']; HF: argmax of trainer.predict on the eval split",
            "eval_samples_per_second": "workbench: eval rows x evaluations / record['timings']['eval_seconds'] "
                                       "(its in-loop evaluation, checkpoint writes included); HF: trainer.predict",
            "predict_samples_per_second": "workbench: load_predictor(run).predict(eval texts, eval batch size) after "
                                          "one warm-up batch; HF: trainer.predict after one warm-up batch",
            "example_order": "HF follows the workbench's plain shuffle" if args.hf_same_order
            else "HF uses its own RandomSampler, as its users run it",
        },
        "sides": summaries,
        **compare(summaries, args.precisions, ceiling),
        "ceiling": {k: v for k, v in ceiling.items() if not k.startswith("load_average") and k != "process_seconds"},
    }
    loads = [x for s in summaries.values() for x in s["load_average_before"] if isinstance(x, (int, float))]
    if args.device == "cpu" and loads and max(loads) > args.threads:
        report["warning"] = (f"the 1-minute load average reached {max(loads)} on {os.cpu_count()} CPUs: other jobs "
                             "competed for the cores, so wall-clock numbers are noisy; compare cpu_ratio, or rerun "
                             "with --threads 1 / more --repeats")
    return report


if __name__ == "__main__":
    sys.exit(main())
