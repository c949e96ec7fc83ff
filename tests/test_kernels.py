"""Uniform-mask dropout (workbench.kernels): same distribution as torch's, gradients, attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.kernels import ATTENTION_NAME, CPUDropout, dropout, math_attention, use_fast_dropout


def test_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # 6 standard deviations at n = 1e6
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.003  # the expectation is unchanged


def test_dropout_is_the_identity_when_not_training_or_p_is_zero() -> None:
    x = torch.randn(64, 8)
    assert torch.equal(dropout(x, 0.3, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)


def test_dropout_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(1)
    x = (torch.rand(4096) + 0.5).requires_grad_()  # no zeros, so y == 0 exactly where dropped
    y = dropout(x, 0.25, training=True)
    g = torch.randn(4096)
    y.backward(g)
    expected = g * (y.detach() != 0) / 0.75
    assert torch.allclose(x.grad, expected)


def test_cpu_dropout_module_is_a_drop_in_nn_dropout() -> None:
    module = nn.Dropout(0.5)
    module.__class__ = CPUDropout
    assert isinstance(module, nn.Dropout) and module.p == 0.5
    module.eval()
    x = torch.randn(10, 10)
    assert torch.equal(module(x), x)
    module.train()
    torch.manual_seed(0)
    out = module(torch.ones(100_000))
    assert abs((out == 0).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_math_attention_equals_torch_sdpa_without_dropout(mask_kind: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    keep[0, ..., 5:] = False  # padding: the first example has 5 real tokens
    mask = {"bool": keep, "float": torch.zeros(2, 1, 7, 7).masked_fill(~keep, float("-inf")),
            "none": None}[mask_kind]
    ours = math_attention(q, k, v, mask, 4 ** -0.5, lambda probs: probs)
    theirs = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.allclose(ours, theirs, atol=1e-5)


def _bert(dropout_prob: float):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout_prob,
                        attention_probs_dropout_prob=dropout_prob, attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}


def test_use_fast_dropout_switches_a_bert_and_undo_restores_it() -> None:
    model = _bert(0.1)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    undo = use_fast_dropout(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is CPUDropout for m in dropouts)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, before, atol=1e-6)  # eval: exactly the same model

    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    undo()
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))


def test_attention_dropout_goes_through_the_uniform_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    import workbench.kernels as kernels

    calls = []
    real = kernels.math_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "math_attention", spy)
    model = _bert(0.1)
    use_fast_dropout(model)
    model.train()
    model(**_batch())
    assert len(calls) == 2  # one per layer
    model.eval()
    model(**_batch())
    assert len(calls) == 2  # no dropout: torch's sdpa kernel


def test_fast_dropout_training_matches_torch_dropout_in_distribution() -> None:
    """Averaged over many masks, a training-mode forward gives the same mean logits either way."""
    model = _bert(0.2)
    batch = _batch()
    model.train()

    def mean_logits(n: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(**batch).logits for _ in range(n)]).mean(0)

    torch.manual_seed(0)
    reference = mean_logits(400)
    undo = use_fast_dropout(model)
    torch.manual_seed(1)
    ours = mean_logits(400)
    undo()
    torch.manual_seed(2)
    again = mean_logits(400)
    noise = (reference - again).abs().max().item()
    assert (ours - reference).abs().max().item() < 3 * noise + 1e-3
