"""Precision: native-bf16 detection, train.precision resolution, a frozen base stored in bf16 under LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from workbench.loop import precision
from workbench.loop.precision import cpu_has_bf16, dtype_report, freeze_base_in_bf16, resolve_precision

ENCODER_TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # every backbone Linear, not the pooler or head


def tiny_bert_lora(use_dora: bool = False, seed: int = 0) -> nn.Module:
    """A 2-layer BERT classifier from a config, LoRA r=4 on every encoder Linear, pooler + classifier trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = BertForSequenceClassification(config)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ENCODER_TARGETS,
                      modules_to_save=["classifier", "pooler"], use_dora=use_dora)
    model = get_peft_model(model, lora)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch(rows: int = 8, length: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: rows // 2, length // 2:] = 0  # padded rows too
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(rows) % 3}


def test_frozen_base_in_bf16_everything_trained_stays_fp32() -> None:
    model = tiny_bert_lora()
    done = freeze_base_in_bf16(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert dtypes["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.bert.encoder.layer.1.output.dense.base_layer.bias"] == torch.bfloat16
    assert dtypes["base_model.model.bert.embeddings.word_embeddings.weight"] == torch.bfloat16
    assert dtypes["base_model.model.bert.embeddings.LayerNorm.weight"] == torch.float32  # not LayerNorm
    assert dtypes["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"] == torch.float32
    # the head (peft keeps a frozen original and a trained copy) and the pooler stay fp32
    assert all(dtypes[n] == torch.float32 for n in dtypes if "classifier" in n or "pooler" in n)
    report = dtype_report(model)
    assert report["frozen bfloat16"] == done.params > 0
    assert set(report) == {"frozen bfloat16", "frozen float32", "trainable float32"}
    assert len(done.modules) == 2 * 6 + 3  # q, k, v, attention out, intermediate, output per layer; 3 embeddings


def test_bf16_base_predicts_as_fp32_within_tolerance() -> None:
    model = tiny_bert_lora().eval()
    fast = copy.deepcopy(model)
    freeze_base_in_bf16(fast)
    b = batch(rows=32)
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = fast(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref)  # the base really ran in bf16
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.03 * scale  # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_training_steps_keep_fp32_grads_and_lower_the_loss() -> None:
    model = tiny_bert_lora()
    freeze_base_in_bf16(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    b = batch()
    losses = []
    for step in range(8):
        loss = model(**b).loss
        assert loss.dtype == torch.float32
        loss.backward()
        if step == 0:
            named = dict(model.named_parameters())
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            # the gradient reaches the first layer's adapters through the second layer's bf16 weights
            first = named["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"]
            assert first.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    state = [s for group in optimizer.state.values() for s in group.values() if torch.is_tensor(s) and s.ndim]
    assert state and all(s.dtype == torch.float32 for s in state)  # AdamW moments in fp32


def test_same_training_losses_as_fp32_within_tolerance() -> None:
    ref, fast = tiny_bert_lora(), tiny_bert_lora()
    freeze_base_in_bf16(fast)
    curves = []
    for model in (ref, fast):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        curve = []
        for _ in range(5):
            loss = model(**batch()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0] != curves[1]
    assert max(abs(a - b) for a, b in zip(*curves)) < 0.05 * curves[0][0]


def test_dora_base_layers_stay_fp32_and_run() -> None:
    model = tiny_bert_lora(use_dora=True)
    done = freeze_base_in_bf16(model)
    assert not [m for m in done.modules if m.endswith("base_layer")]
    assert done.modules  # the embeddings are still cast
    loss = model(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_tied_output_embeddings_stay_fp32() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    done = freeze_base_in_bf16(model)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # it is the head too
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert "model.embed_tokens" not in done.modules and "lm_head" not in done.modules
    logits = model(input_ids=torch.randint(0, 128, (2, 8))).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_skip_and_trainable_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)  # model[3] stays trainable: a head
    done = freeze_base_in_bf16(model, skip=("0",))
    assert done.modules == ["1"]
    assert [p.dtype for p in model.parameters()] == [torch.float32, torch.bfloat16, torch.bfloat16] + [torch.float32] * 4
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32


def test_bitsandbytes_layers_are_not_cast() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear4bit(16, 16), nn.Linear(16, 4)).requires_grad_(False)
    done = freeze_base_in_bf16(model)
    assert done.modules == ["1"]
    assert model[0].weight.dtype != torch.bfloat16


def test_remove_takes_hooks_off_and_restores_fp32() -> None:
    model = tiny_bert_lora().eval()
    done = freeze_base_in_bf16(model)
    done.remove(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    b = batch()
    with torch.no_grad():
        assert model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.dtype == torch.float32


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma {extra}\n\nprocessor\t: 1\nflags\t\t: fpu avx2 {extra}\n"


@pytest.mark.parametrize("extra,expected", [("", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True),
                                            ("avx512f avx512_vnni", False)])
def test_cpu_has_bf16_reads_the_flags(extra: str, expected: bool) -> None:
    assert cpu_has_bf16(CPUINFO.format(extra=extra)) is expected


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept, even where emulated


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple,
                                                    expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_precision("auto", "cuda:0") == expected


def test_unknown_precision_is_named() -> None:
    with pytest.raises(ValueError, match=r"train.precision = 'fp16' is not allowed: choose one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")  # type: ignore[arg-type]
