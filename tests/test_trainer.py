"""The training loop on a tiny BERT: events, accumulation, reproducibility, resume, stops, guards."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from workbench.callbacks import Callback
from workbench.catalog import resolve_model
from workbench.data import prepare
from workbench.models.classifier import build_model
from workbench.loop import train
from workbench.loop.trainer import accumulate_gradients
from workbench.tasks.classification import ClassificationTask, collate


class Recorder(Callback):
    """Records the event names (and step losses) in order."""

    def __init__(self):
        self.events, self.losses, self.evals = [], [], []

    def on_train_begin(self, state, config):
        self.events.append("train_begin")

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        assert isinstance(loss, float) and isinstance(learning_rate, float)
        self.events.append("step_end")
        self.losses.append(loss)

    def on_evaluate(self, state, control, result):
        assert all(isinstance(row, list) for row in result.payload["confusion_matrix"])
        self.events.append("evaluate")
        self.evals.append(result.metrics["accuracy"])

    def on_checkpoint(self, state, path, is_best):
        self.events.append("checkpoint")

    def on_exception(self, state, message):
        self.events.append("exception")

    def on_train_end(self, state, status, metrics):
        self.events.append(f"train_end:{status}")


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        if state.global_step == self.step:
            control.request_stop("test stop")


def test_event_sequence_is_pinned(tiny_config, store):
    rec = Recorder()
    record = train(tiny_config(), store=store, callbacks=[rec])
    steps = 9  # 72 training rows / batch 8, per epoch
    assert rec.events == (["train_begin"] + ["step_end"] * steps + ["evaluate", "checkpoint"]
                          + ["step_end"] * steps + ["evaluate", "checkpoint", "train_end:completed"])
    assert record["status"] == "completed" and record["error"] is None
    m = record["metrics"]
    assert set(m) >= {"accuracy", "f1_macro", "eval_loss", "labels", "confusion_matrix", "best_step"}
    assert m["labels"] == ["neg", "pos"] and sum(map(sum, m["confusion_matrix"])) == 24
    assert rec.losses[-1] < rec.losses[0], "the loss must fall on learnable data"
    assert m["accuracy"] > 0.8
    t = record["timings"]
    assert t["samples_per_second"] > 0 and t["wall_seconds"] > 0 and t["peak_memory_mb"] > 0
    # the live history is in the store, in order
    kinds = [p["kind"] for p in store.points(record["id"])]
    assert kinds.count("train") == 2 * steps and kinds.count("eval") == 2
    # the best model was saved for predict
    assert (Path(record["dir"]) / "model" / "trainable.safetensors").is_file()


def test_gradient_accumulation_4x4_equals_one_batch_of_16(tiny_config):
    from accelerate import Accelerator

    cfg = tiny_config(method={"name": "full"})
    split = prepare(cfg.data, cfg.train.seed)
    source = resolve_model(cfg.model, Path("."), False)
    built = build_model(cfg, source, split.labels)
    model, tok = built.model, built.tokenizer
    enc = [dict(e) for e in (lambda b: [{k: b[k][i] for k in b.keys()} for i in range(16)])(
        tok(split.train_texts[:16], truncation=True, max_length=32))]
    acc = Accelerator(cpu=True)
    grads = []
    for sizes in ([16], [4, 4, 4, 4], [6, 6, 4]):
        model.zero_grad()
        batches, start = [], 0
        for n in sizes:
            batches.append(collate(tok, enc, list(range(start, start + n)), split.train_labels))
            start += n
        loss = accumulate_gradients(ClassificationTask(), built, model, acc, batches)
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss16, g16) = grads[0]
    for loss, g in grads[1:]:
        assert loss == pytest.approx(loss16, rel=1e-5)
        for name in g16:
            torch.testing.assert_close(g[name], g16[name], rtol=1e-4, atol=1e-6)


def test_accumulated_run_logs_the_same_loss_as_one_big_batch(tiny_config, store):
    a, b = Recorder(), Recorder()
    train(tiny_config(train={"batch_size": 16, "epochs": 1}), store=store, callbacks=[a])
    train(tiny_config(train={"batch_size": 4, "gradient_accumulation": 4, "epochs": 1}), store=store, callbacks=[b])
    assert len(a.losses) == len(b.losses) == 5
    assert b.losses == pytest.approx(a.losses, rel=1e-4), "accumulation must not scale the loss (HF Trainer multiplies it by the steps)"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_losses(tiny_config, store, monkeypatch, method):
    """Each checkpointed layer runs twice per training step (forward, then again in the backward), and the
    losses are those of a plain run, dropout included (the recomputation replays the RNG state)."""
    import workbench.loop.trainer as trainer
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = {"n": 0}
    real = trainer.enable_gradient_checkpointing

    def spy(model):
        real(model)
        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):  # its forward is checkpointed: hook a module inside
                next(m.children()).register_forward_pre_hook(
                    lambda module, args: calls.__setitem__("n", calls["n"] + 1) if module.training else None)

    monkeypatch.setattr(trainer, "enable_gradient_checkpointing", spy)
    base = {"method": {"name": method, "dropout": 0.1}, "train": {"epochs": 1, "learning_rate": 1e-3}}
    plain, checkpointed = Recorder(), Recorder()
    train(tiny_config(**base), store=store, callbacks=[plain])
    assert calls["n"] == 0
    cfg = tiny_config(method=base["method"], train={**base["train"], "gradient_checkpointing": True})
    record = train(cfg, store=store, callbacks=[checkpointed])
    assert record["status"] == "completed", record["error"]
    layers = 2  # the tiny BERT of conftest
    assert calls["n"] == 2 * layers * len(checkpointed.losses), "each layer: one forward and one recomputation"
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_same_seed_same_metrics(tiny_config, store):
    cfg = tiny_config(method={"dropout": 0.1})
    r1, r2 = Recorder(), Recorder()
    m1 = train(cfg, store=store, callbacks=[r1])["metrics"]
    m2 = train(cfg, store=store, callbacks=[r2])["metrics"]
    assert r1.losses == r2.losses
    assert m1["accuracy"] == m2["accuracy"] and m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=1e-7)


def test_stopped_run_resumes_to_the_same_result(tiny_config, store):
    cfg = tiny_config(method={"dropout": 0.1}, train={"epochs": 3})
    full = Recorder()
    reference = train(cfg, store=store, callbacks=[full])
    first = Recorder()
    stopped = train(cfg, store=store, callbacks=[first, StopAt(13)])  # mid second epoch
    assert stopped["status"] == "stopped"
    ckpts = list((Path(stopped["dir"]) / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-13"]
    second = Recorder()
    resumed = train(cfg, store=store, run_id=stopped["id"], callbacks=[second], resume=True)
    assert resumed["status"] == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed["metrics"]["accuracy"] == reference["metrics"]["accuracy"]
    assert resumed["metrics"]["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], abs=1e-6)
    # the store's history has every step once
    steps = [p["step"] for p in store.points(stopped["id"], kind="train")]
    assert steps == list(range(1, 28))


def test_early_stopping_restores_the_best_checkpoint(tiny_config, store):
    # a model that learns the tiny set and then stops improving (a frozen one answering a single class would
    # not stop: such evaluations do not count toward patience, tests/test_early_stopping.py)
    rec = Recorder()
    cfg = tiny_config(train={"learning_rate": 5e-3, "eval_every": 2, "early_stopping_patience": 2, "epochs": 6,
                             "best_metric": "f1_macro"})
    record = train(cfg, store=store, callbacks=[rec])
    assert record["status"] == "completed"
    evals = store.points(record["id"], kind="eval")
    best = max(evals, key=lambda e: e["f1_macro"])  # the first of the best
    assert record["metrics"]["best_step"] == best["step"]
    assert [e["step"] for e in evals][-1] == best["step"] + 2 * 2, "stopped two evaluations after the best"
    assert rec.events.count("evaluate") == len(evals) and evals[-1]["step"] < 54
    events = [p["event"] for p in store.points(record["id"], kind="event")]
    assert "early_stop" in events


def test_nan_loss_stops_the_run_with_a_clear_reason(tiny_config, store):
    rec = Recorder()
    cfg = tiny_config(method={"name": "full"}, train={"learning_rate": 1e30, "max_grad_norm": 0.0})
    record = train(cfg, store=store, callbacks=[rec])
    assert record["status"] == "failed"
    assert "training loss became nan" in record["error"] and "lower train.learning_rate" in record["error"]
    assert rec.events[-2:] == ["exception", "train_end:failed"]


def test_stop_requested_from_another_thread(tiny_config, store):
    cfg = tiny_config(train={"epochs": 30})

    def stopper():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = store.list()
            if runs and store.points(runs[0]["id"], kind="train"):
                store.request_stop(runs[0]["id"])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=stopper)
    thread.start()
    record = train(cfg, store=store)
    thread.join()
    assert record["status"] == "stopped" and record["timings"]["steps"] < 30 * 9
    assert list((Path(record["dir"]) / "checkpoints").glob("step-*")), "a stop saves a checkpoint"


def test_head_only_trains_only_the_head(tiny_config, store):
    record = train(tiny_config(method={"name": "head-only"}, train={"epochs": 1}), store=store)
    info = record["info"]
    assert info["head_modules"] == ["bert.pooler", "classifier"]
    assert info["trainable_params"] == 32 * 32 + 32 + 32 * 2 + 2  # pooler dense + classifier


def test_lora_targets_and_parameter_count_are_pinned(tiny_config):
    cfg = tiny_config(method={"target_modules": ["query", "value"], "r": 4, "train_head": False})
    split = prepare(cfg.data, cfg.train.seed)
    built = build_model(cfg, resolve_model(cfg.model, Path("."), False), split.labels)
    # 2 layers x (query + value) x r (32 + 32), plus the classifier (32 x 2 + 2)
    assert built.trainable_params == 2 * 2 * 4 * 64 + 66
    assert sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}) == ["query", "value"]


def test_wandb_offline_and_tensorboard_write_into_the_run_dir(tiny_config, store):
    record = train(tiny_config(train={"epochs": 1}, track={"wandb": "offline", "tensorboard": True}), store=store)
    run_dir = Path(record["dir"])
    assert record["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline writes its run files locally"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_predictions_file_backs_the_confusion_matrix(tiny_config, store):
    record = train(tiny_config(train={"epochs": 1}), store=store)
    preds = json.loads(Path(record["metrics"]["predictions_file"]).read_text())
    assert len(preds["rows"]) == 24
    cm = record["metrics"]["confusion_matrix"]
    for i, t in enumerate(preds["labels"]):
        for j, p in enumerate(preds["labels"]):
            assert cm[i][j] == sum(1 for r in preds["rows"] if r["true"] == t and r["predicted"] == p)


def test_a_run_leaves_the_callers_thread_count_alone(tiny_config, store):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(tiny_config(train={"epochs": 1, "threads": 1}), store=store)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bf16_precision_keeps_a_frozen_bf16_base_and_fp32_adapters(tiny_config, store):
    """train.precision bf16 with LoRA: the frozen base is stored in bf16, what trains stays fp32, and the run
    follows the fp32 one closely (auto resolves per device: fp32 on a CPU without native bf16)."""
    a, b = Recorder(), Recorder()
    fp32 = train(tiny_config(train={"precision": "fp32"}), store=store, callbacks=[a])
    bf16 = train(tiny_config(train={"precision": "bf16"}), store=store, callbacks=[b])
    assert fp32["status"] == bf16["status"] == "completed", bf16["error"]
    assert (fp32["info"]["precision"], bf16["info"]["precision"]) == ("fp32", "bf16")
    assert b.losses[0] == pytest.approx(a.losses[0], rel=2e-2)
    assert abs(bf16["metrics"]["accuracy"] - fp32["metrics"]["accuracy"]) <= 0.1
    from safetensors.torch import load_file

    saved = load_file(str(Path(bf16["dir"]) / "model" / "trainable.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values()), "adapters and head stay fp32"


def test_length_bucketing_covers_every_row_once_and_keeps_accumulation_exact(tiny_config, store):
    from workbench.loop.trainer import epoch_steps

    cfg = tiny_config(train={"batch_size": 4, "gradient_accumulation": 4, "length_bucketing": True})
    lengths = [5 + (i * 7) % 40 for i in range(72)]
    for epoch in (0, 1):
        steps = epoch_steps(cfg, lengths, epoch, 0, 1)
        rows = [i for step in steps for micro in step for i in micro]
        assert sorted(rows) == list(range(72)), "every row exactly once per epoch"
        assert all(len(micro) <= 4 for step in steps for micro in step)
        assert steps == epoch_steps(cfg, lengths, epoch, 0, 1), "reproducible from the seed"
    a, b = Recorder(), Recorder()
    one = train(tiny_config(train={"batch_size": 16, "epochs": 1, "length_bucketing": True}), store=store,
                callbacks=[a])
    accumulated = train(tiny_config(train={"batch_size": 4, "gradient_accumulation": 4, "epochs": 1,
                                           "length_bucketing": True}), store=store, callbacks=[b])
    assert one["status"] == accumulated["status"] == "completed"
    assert len(a.losses) == len(b.losses) == 5 and b.losses == pytest.approx(a.losses, rel=1e-4)


def test_peak_memory_is_the_runs_own_not_its_launchers():
    """Linux carries ru_maxrss over fork and exec: a run launched from a big notebook kernel reported the
    kernel's size as its own peak. A launcher holding 1 GiB starts a process that reports its own."""
    import subprocess
    import sys

    held = bytearray(1 << 30)
    for i in range(0, len(held), 4096):  # touched: resident, not only reserved
        held[i] = 1
    code = ("import torch; from workbench.loop.lifecycle import peak_memory_mb; "
            "print(peak_memory_mb(torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    del held
    reported = float(out.stdout.strip())
    assert 50 < reported < 800, reported  # importing torch: ~300 MiB; through ru_maxrss: over 1,024
