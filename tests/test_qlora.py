"""QLoRA on CPU (bitsandbytes nf4 + LoRA) and the silent failures found in it on this stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from workbench.catalog import resolve_model  # noqa: E402
from workbench.data import prepare  # noqa: E402
from workbench.models.classifier import build_model  # noqa: E402
from workbench.loop import train  # noqa: E402
from workbench.tasks.classification import collate  # noqa: E402


def _built(tiny_config, **method):
    cfg = tiny_config(method={"name": "qlora", **method})
    split = prepare(cfg.data, cfg.train.seed)
    return cfg, split, build_model(cfg, resolve_model(cfg.model, Path("."), False), split.labels)


def test_backbone_is_4bit_and_the_head_is_not(tiny_config):
    _, _, built = _built(tiny_config)
    modules = dict(built.model.named_modules())
    four_bit = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the backbone's linear layers must be quantised"
    assert not any("classifier" in n or "pooler" in n for n in four_bit), "the head stays out of 4-bit"
    # the repack trap is disarmed on every 4-bit layer
    assert all(modules[n].support_avx512bf16_for_cpu is False for n in four_bit)


def test_lora_gradients_survive_an_evaluation_pass(tiny_config):
    """After a no-grad eval forward on an AVX512-BF16 CPU, 4-bit weights were repacked and LoRA grads went to zero."""
    cfg, split, built = _built(tiny_config)
    model, tok = built.model, built.tokenizer
    enc = tok(split.train_texts[:8], truncation=True, max_length=32)
    encs = [{k: enc[k][i] for k in enc.keys()} for i in range(8)]
    batch = collate(tok, encs, list(range(8)), split.train_labels)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    model.train()
    model(**batch).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert sum(float(g.abs().sum()) for g in lora_grads) > 0, "LoRA gradients must not vanish after eval"


def test_qlora_trains_and_the_loss_falls_across_evaluations(tiny_config, store):
    losses = []

    from workbench.callbacks import Callback

    class Losses(Callback):
        def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
            losses.append(loss)

    cfg = tiny_config(method={"name": "qlora"}, train={"epochs": 3, "eval_every": 3, "learning_rate": 5e-3})
    record = train(cfg, store=store, callbacks=[Losses()])
    assert record["status"] == "completed", record["error"]
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, "loss must keep falling after evals"
    assert record["metrics"]["accuracy"] > 0.6
    assert record["info"]["trainable_params"] < record["info"]["total_params"] / 10
