"""The peft methods besides lora: pinned trainable counts, a short training run each, their config
rules, IA3 targets on other architectures, AdaLoRA's rank pruning, and the prefix-tuning refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workbench.catalog import resolve_model
from workbench.config import Config, MethodConfig
from workbench.data import prepare
from workbench.errors import WorkbenchError
from workbench.models.adapters import after_optimizer_step, head_module_names, ia3_targets
from workbench.models.classifier import build_model, check_model_fits
from workbench.models.inspect import inspect_model
from workbench.loop import preflight, train
from workbench.tasks.classification import collate

# The tiny BERT of conftest: hidden 32, 2 layers, intermediate 64, 2 labels. Per layer it has six
# linear layers: query, key, value, attention output (32 -> 32), intermediate (32 -> 64) and
# output (64 -> 32). The head is the pooler (32 x 32 + 32) and the classifier (32 x 2 + 2).
HEAD = 32 * 32 + 32 + 32 * 2 + 2
LINEAR = [(32, 32)] * 4 + [(32, 64), (64, 32)]  # (in, out) of each layer's linear layers
R, INIT_R, TOKENS = 4, 6, 5

PINNED = {
    # LoRA: A (r x in) + B (out x r) per target
    "lora": HEAD + 2 * sum(R * (i + o) for i, o in LINEAR),
    # DoRA adds a magnitude per output feature; rsLoRA changes only the scale
    "lora+dora": HEAD + 2 * sum(R * (i + o) + o for i, o in LINEAR),
    "lora+rslora": HEAD + 2 * sum(R * (i + o) for i, o in LINEAR),
    # AdaLoRA: A (init_r x in) + B (out x init_r) + E (init_r singular values) per target
    "adalora": HEAD + 2 * sum(INIT_R * (i + o + 1) for i, o in LINEAR),
    # IA3: key and value (32 outputs each) and the feed-forward down projection (64 inputs)
    "ia3": HEAD + 2 * (32 + 32 + 64),
    # prompt tuning: one 32-wide embedding per virtual token
    "prompt-tuning": HEAD + TOKENS * 32,
}
METHOD_FIELDS = {
    "lora": {"name": "lora"},
    "lora+dora": {"name": "lora", "use_dora": True},
    "lora+rslora": {"name": "lora", "use_rslora": True},
    "adalora": {"name": "adalora", "init_r": INIT_R},
    "ia3": {"name": "ia3"},
    "prompt-tuning": {"name": "prompt-tuning", "num_virtual_tokens": TOKENS},
}
PREFIX_REFUSAL = (r"method prefix-tuning does not work on BertForSequenceClassification \(model_type 'bert'\) "
                  r"with this peft and transformers: .*`past_key_values`.* Use prompt-tuning .*, lora or ia3 instead")


def _build(cfg: Config, total_steps: int | None = None):
    split = prepare(cfg.data, cfg.train.seed)
    return build_model(cfg, resolve_model(cfg.model, Path("."), False), split.labels, total_steps=total_steps), split


@pytest.mark.parametrize("variant", list(PINNED))
def test_trainable_counts_are_pinned_and_inspect_agrees(tiny_config, variant):
    fields = METHOD_FIELDS[variant]
    cfg = tiny_config(method={"r": R, **fields})
    built, _ = _build(cfg)
    assert built.trainable_params == PINNED[variant]
    info = inspect_model(cfg.model, method=fields["name"], num_labels=2, r=R, init_r=INIT_R,
                         num_virtual_tokens=TOKENS, use_dora=fields.get("use_dora", False))
    assert info["trainable_parameters"] == built.trainable_params
    assert info["note"] is None


@pytest.mark.parametrize("name", ["adalora", "ia3", "prompt-tuning"])
def test_the_head_stays_trainable_and_can_be_left_out(tiny_config, name):
    with_head, _ = _build(tiny_config(method={"name": name, "r": R, "init_r": INIT_R}))
    trained = [n for n, p in with_head.model.named_parameters() if p.requires_grad]
    assert any("pooler" in n for n in trained) and any("classifier" in n for n in trained)
    without, _ = _build(tiny_config(method={"name": name, "r": R, "init_r": INIT_R, "train_head": False}))
    assert with_head.trainable_params - without.trainable_params == 32 * 32 + 32  # the pooler only
    info = inspect_model(tiny_config().model, method=name, r=R, init_r=INIT_R, train_head=False)
    assert info["trainable_parameters"] == without.trainable_params


@pytest.mark.parametrize("variant, lr", [
    ("lora+dora", 5e-3), ("lora+rslora", 5e-3), ("adalora", 5e-3), ("ia3", 3e-2), ("prompt-tuning", 3e-2),
])
def test_each_method_trains_through_the_loop(tiny_config, store, variant, lr):
    cfg = tiny_config(method={"r": R, **METHOD_FIELDS[variant]},
                      train={"epochs": 1, "learning_rate": lr, "batch_size": 12})
    record = train(cfg, store=store)
    assert record["status"] == "completed", record["error"]
    assert math.isfinite(record["metrics"]["eval_loss"])
    assert record["info"]["trainable_params"] == PINNED[variant]
    assert (Path(record["dir"]) / "model" / "trainable.safetensors").is_file()


def test_prefix_tuning_on_bert_is_refused_in_preflight_and_in_build(tiny_config, store):
    cfg = tiny_config(method={"name": "prefix-tuning"})
    with pytest.raises(WorkbenchError, match=PREFIX_REFUSAL):
        preflight(cfg, store.home)
    with pytest.raises(WorkbenchError, match=PREFIX_REFUSAL):
        check_model_fits(cfg, resolve_model(cfg.model, Path("."), False), 2)
    with pytest.raises(WorkbenchError, match=PREFIX_REFUSAL):
        _build(cfg)
    info = inspect_model(cfg.model, method="prefix-tuning")
    assert info["trainable_parameters"] is None
    assert "prefix-tuning does not work on BertForSequenceClassification" in info["note"]


def test_virtual_tokens_count_against_the_context_limit(tiny_config, store):
    cfg = tiny_config(method={"name": "prompt-tuning", "num_virtual_tokens": 100}, train={"max_length": 32})
    with pytest.raises(WorkbenchError, match=r"train.max_length = 32 plus method.num_virtual_tokens = 100 is "
                                             r"beyond the model's limit of 128 tokens"):
        preflight(cfg, store.home)


@pytest.mark.parametrize("fields, match", [
    ({"name": "ia3", "use_dora": True}, r"method.use_dora = True is not allowed: false for ia3"),
    ({"name": "adalora", "use_rslora": True}, r"method.use_rslora = True is not allowed: false for adalora"),
    ({"name": "adalora", "r": 16, "init_r": 8}, r"method.init_r = 8 is not allowed: at least method.r = 16"),
    ({"init_r": 0}, r"method.init_r = 0 is not allowed: a starting rank >= 1"),
    ({"rank_warmup_ratio": 1.0}, r"method.rank_warmup_ratio = 1.0 is not allowed: a fraction"),
    ({"rank_warmup_ratio": 0.5, "rank_final_ratio": 0.5}, r"method.rank_final_ratio = 0.5 is not allowed: less than"),
    ({"num_virtual_tokens": 0}, r"method.num_virtual_tokens = 0 is not allowed: at least 1 token"),
    ({"name": "prompt-tuning", "target_modules": ["query"]},
     r"method.target_modules = \['query'\] is not allowed: 'auto' for prompt-tuning"),
    ({"name": "prefix_tuning"}, r"method.name = 'prefix_tuning' is not allowed: expected one of .*'prefix-tuning'"),
])
def test_bad_method_fields_name_the_field_and_the_fix(fields, match):
    with pytest.raises(WorkbenchError, match=match):
        Config.from_dict({"method": fields})


def test_ia3_targets_are_found_by_shape_on_other_architectures():
    """Llama with grouped-query attention: k_proj and v_proj narrow their input, yet are not feed-forward."""
    from transformers import AutoModelForSequenceClassification, DistilBertConfig, LlamaConfig

    llama = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=3)
    distil = DistilBertConfig(vocab_size=100, dim=32, hidden_dim=80, n_layers=2, n_heads=2, num_labels=3)
    for cfg, expected_kv, expected_ff in [(llama, {"k_proj", "v_proj"}, {"down_proj"}),
                                          (distil, {"k_lin", "v_lin"}, {"lin2"})]:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
        targets, ff = ia3_targets(model, MethodConfig(name="ia3"), head_module_names(model))
        short = lambda names: {n.rsplit(".", 1)[-1] for n in names}  # noqa: E731
        assert short(targets) == expected_kv | expected_ff and short(ff) == expected_ff
        assert len(targets) == 2 * 3 and len(ff) == 2  # per layer: key, value, down projection


def test_adalora_prunes_ranks_to_the_budget_on_its_schedule(tiny_config):
    """after_optimizer_step drives peft's rank allocator: at the last step every layer keeps on average r."""
    cfg = tiny_config(method={"name": "adalora", "r": 2, "init_r": INIT_R, "rank_warmup_ratio": 0.0,
                              "rank_final_ratio": 0.0})
    steps = 6
    built, split = _build(cfg, total_steps=steps)
    model, tok = built.model, built.tokenizer
    enc = tok(split.train_texts[:16], truncation=True, max_length=32)
    encs = [{k: enc[k][i] for k in enc.keys()} for i in range(16)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        model(**collate(tok, encs, list(range(16)), split.train_labels)).loss.backward()
        opt.step()
        after_optimizer_step(built.model, built.method, step)
        opt.zero_grad(set_to_none=True)
    e = [p for n, p in model.named_parameters() if "lora_E" in n]
    kept = sum(int(torch.count_nonzero(p)) for p in e)
    assert len(e) == 12 and kept <= 2 * len(e) < INIT_R * len(e)


def test_the_hook_is_a_no_op_elsewhere(tiny_config):
    lora, _ = _build(tiny_config())
    before = {n: p.clone() for n, p in lora.model.named_parameters() if p.requires_grad}
    after_optimizer_step(lora.model, lora.method, 1)
    unscheduled, _ = _build(tiny_config(method={"name": "adalora", "init_r": 8}))  # no total_steps
    after_optimizer_step(unscheduled.model, unscheduled.method, 1)  # no gradients exist: it would fail if it ran the allocator
    assert all(torch.equal(p, before[n]) for n, p in lora.model.named_parameters() if p.requires_grad)


def test_the_loop_prunes_adalora_ranks(tiny_config, store):
    from safetensors.torch import load_file

    cfg = tiny_config(method={"name": "adalora", "r": 2, "init_r": INIT_R},
                      train={"epochs": 1, "batch_size": 12, "eval_every": 100})
    record = train(cfg, store=store)
    assert record["status"] == "completed", record["error"]
    state = load_file(str(Path(record["dir"]) / "model" / "trainable.safetensors"))
    e = [v for n, v in state.items() if "lora_E" in n]
    assert sum(int(torch.count_nonzero(v)) for v in e) <= 2 * len(e)
