"""Adversarial training on the input embeddings (train.adversarial: fgm | pgd): the perturbation's size and
direction, the gradient a step takes (clean + perturbed), frozen embeddings (LoRA), a run that records it,
and the settings refused with a reason."""

from __future__ import annotations

import pytest
import torch

from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop.adversarial import EmbeddingAttack


def _classifier(tiny_model_dir, lora: bool = False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.eval()  # no dropout: two forward passes of the same input agree
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 task_type="SEQ_CLS"))
        model.eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batch = tok(["a good film", "a dull and slow film"], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 0])
    return model, batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fgm_step_is_the_clean_gradient_plus_the_gradient_at_the_normalised_perturbation(tiny_model_dir):
    model, batch = _classifier(tiny_model_dir)
    emb = model.get_input_embeddings()
    # the clean gradient at the embeddings' output, by hand
    keep = {}
    handle = emb.register_forward_hook(lambda m, i, o: keep.setdefault("out", o.retain_grad() or o))
    loss = model(**batch).loss
    loss.backward()
    handle.remove()
    g = keep["out"].grad
    clean = _grads(model)
    r = 1.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    model.zero_grad()
    handle = emb.register_forward_hook(lambda m, i, o: o + r)
    model(**batch).loss.backward()
    handle.remove()
    perturbed = _grads(model)
    model.zero_grad()

    attack = EmbeddingAttack(model, "fgm", epsilon=1.0)
    reported = attack.step(lambda: model(**batch).loss, lambda l: l.backward())
    got = _grads(model)
    assert reported.item() == pytest.approx(loss.item(), rel=1e-5), "the step reports the clean loss"
    for name in clean:
        torch.testing.assert_close(got[name], clean[name] + perturbed[name], rtol=1e-4, atol=1e-6)
    assert any((perturbed[n] - clean[n]).abs().max() > 1e-6 for n in clean), "the perturbation changed something"


def test_the_perturbed_loss_is_higher_than_the_clean_one(tiny_model_dir):
    """The attack goes uphill: FGM's and PGD's perturbed losses exceed the clean loss."""
    model, batch = _classifier(tiny_model_dir)
    for kind in ("fgm", "pgd"):
        losses = []
        attack = EmbeddingAttack(model, kind, epsilon=2.0, steps=3)

        def loss_of():
            out = model(**batch).loss
            losses.append(out.item())
            return out

        attack.step(loss_of, lambda l: l.backward())
        model.zero_grad()
        assert losses[-1] > losses[0], (kind, losses)
        assert len(losses) == (2 if kind == "fgm" else 4), "fgm: clean + perturbed; pgd: + 2 more ascent steps"


def test_pgd_stays_inside_the_epsilon_ball(tiny_model_dir):
    model, batch = _classifier(tiny_model_dir)
    attack = EmbeddingAttack(model, "pgd", epsilon=0.5, steps=4)
    seen = []
    original = attack._adding

    def spy(delta):
        seen.append(delta.detach().flatten(1).norm(dim=1))
        return original(delta)

    attack._adding = spy
    attack.step(lambda: model(**batch).loss, lambda l: l.backward())
    assert len(seen) == 4 and all((n <= 0.5 + 1e-5).all() for n in seen)


def test_frozen_embeddings_lora_still_gets_the_adversarial_gradient(tiny_model_dir):
    model, batch = _classifier(tiny_model_dir, lora=True)
    assert not model.get_input_embeddings().weight.requires_grad
    model(**batch).loss.backward()
    clean = _grads(model)
    model.zero_grad()
    EmbeddingAttack(model, "fgm", epsilon=1.0).step(lambda: model(**batch).loss, lambda l: l.backward())
    both = _grads(model)
    lora = [n for n in clean if "lora_" in n]
    assert lora and any((both[n] - clean[n]).abs().max() > 1e-7 for n in lora)


def test_a_run_with_fgm_completes_and_records_the_attack(tiny_config, store):
    from workbench.loop import train

    config = tiny_config(train={"epochs": 1, "adversarial": "fgm", "adversarial_epsilon": 0.5})
    record = train(config, store=store)
    assert record["status"] == "completed"
    assert record["info"]["adversarial"] == {"method": "fgm", "epsilon": 0.5}
    assert record["config"]["train"]["adversarial"] == "fgm"
    assert record["metrics"]["accuracy"] is not None


@pytest.mark.parametrize("raw, says", [
    ({"task": "chat", "data": {"source": "x.jsonl"}, "method": {"name": "lora"}, "train": {"adversarial": "fgm"}},
     "generation is not covered"),
    ({"method": {"name": "zero-shot-embedding"}, "train": {"adversarial": "fgm"}}, "trains no weights"),
    ({"train": {"adversarial": "fgm", "adversarial_epsilon": 0}}, "a norm > 0"),
    ({"train": {"adversarial": "pgd", "adversarial_steps": 0}}, "at least 1 step"),
])
def test_settings_the_attack_cannot_use_are_refused_with_the_reason(raw, says):
    with pytest.raises(WorkbenchError, match=says):
        Config.from_dict(raw)
