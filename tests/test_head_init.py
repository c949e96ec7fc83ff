"""train.head_init: probe: a text classifier's logit layer starts as a logistic regression fitted on the encoder's
features of the training texts, and untrained square head layers (a zero-bias pooler) start as the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.catalog import resolve_model
from workbench.models.head_init import fit_probe, head_layers, identity_layers, probe_features
from workbench.tasks.classification import ClassificationTask, pad_batch


def _built(tiny_config, store, method: str, head_init: str = "probe", method_train_head: bool = True):
    config = tiny_config(method={"name": method, "train_head": method_train_head}, train={"head_init": head_init})
    task = ClassificationTask()
    data = task.load_data(config, store.home)
    source = resolve_model(config.model, store.home)
    return config, data, task.build(config, source, data, total_steps=10)


def _logits(built, texts: list[str], max_length: int = 32) -> np.ndarray:
    batch = pad_batch(built.tokenizer, built.encode(texts, max_length))
    built.model.eval()
    with torch.no_grad():
        return built.model(**batch).logits.numpy()


@pytest.mark.parametrize("method", ["lora", "full", "head-only"])
def test_the_head_answers_as_the_probe_before_the_first_step(tiny_config, store, method):
    from sklearn.linear_model import LogisticRegression

    config, data, built = _built(tiny_config, store, method)
    info = built.head_init
    assert info["method"] == "probe" and info["rows"] == len(data.train_texts)
    assert info["identity_layers"] >= 1  # the tiny BERT's pooler was saved untrained: bias all zeros
    logits = _logits(built, data.train_texts)
    # the logit layer that runs (peft's trained copy, not the original) holds the probe: the model's own
    # answers on the training texts score the probe's training accuracy, and its logit gap is the probe's
    # decision function refitted on the features that layer receives
    accuracy = float((logits.argmax(axis=1) == np.asarray(data.train_labels)).mean())
    assert accuracy == pytest.approx(info["train_accuracy"], abs=1e-4)
    layers = head_layers(built.model, built.head_modules, len(data.labels))
    batches = [pad_batch(built.tokenizer, built.encode(data.train_texts, 32))]
    ran, features = probe_features(built.model, layers, batches)
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(features, data.train_labels)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], probe.decision_function(features), atol=1e-3)


def test_random_head_init_leaves_transformers_head(tiny_config, store):
    from workbench.config import Config

    assert Config.from_dict({"model": "minilm-l6", "data": {"source": "x.csv"}}).train.head_init == "random"
    _, data, probed = _built(tiny_config, store, "lora")
    _, _, plain = _built(tiny_config, store, "lora", head_init="random")
    assert plain.head_init is None
    assert not np.allclose(_logits(probed, data.train_texts), _logits(plain, data.train_texts))


def test_only_untrained_square_layers_become_the_identity(tiny_config, store):
    config, data, built = _built(tiny_config, store, "full", head_init="random")
    pooler = built.model.bert.pooler.dense
    assert len(identity_layers(built.model, built.head_modules, [], 2)) == 1  # zero bias: never trained
    with torch.no_grad():
        pooler.bias.fill_(0.01)  # a trained pooler (bert-base's, trained on next-sentence prediction) is kept
    assert identity_layers(built.model, built.head_modules, [], 2) == []
    assert len(identity_layers(built.model, built.head_modules, ["bert.pooler.dense"], 2)) == 1  # or missing


def test_probe_weights_give_sklearn_probabilities_for_two_and_more_classes():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    for labels, num_labels in [((x[:, 0] > 0).astype(int), 2), ((x[:, 0] > 0).astype(int) + (x[:, 1] > 0), 3)]:
        weights, bias, accuracy = fit_probe(x, labels.tolist(), num_labels, balanced=False)
        logits = x @ weights.T + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        expected = LogisticRegression(C=1.0, max_iter=3000).fit(x, labels).predict_proba(x)
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert accuracy > 0.8
    weights, bias, _ = fit_probe(x, [int(v > 0) * 2 for v in x[:, 0]], 3, balanced=True)  # class 1 has no rows
    assert not weights[1].any() and bias[1] < bias[[0, 2]].min()


def test_a_run_records_how_its_head_started(tiny_config, store):
    from workbench.loop import train

    record = train(tiny_config(train={"baseline": False, "ensemble": "off", "head_init": "probe"}), store=store)
    assert record["status"] == "completed", record.get("error")
    assert record["info"]["head_init"]["method"] == "probe"
    assert record["info"]["head_init"]["rows"] == 72



def test_a_head_that_does_not_train_keeps_its_start(tiny_config, store):
    # only trained weights are saved with a run: a frozen probe head would be lost when the run is reloaded
    _, data, built = _built(tiny_config, store, "lora", method_train_head=False)
    assert built.head_init["method"] == "random" and "train_head" in built.head_init["why"]
