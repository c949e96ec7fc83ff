"""train.truncation "chunks": a long text read whole as overlapping chunks, each a training example with the
text's label or value, whose predictions are averaged into one per text in evaluation, predict and the
optimised artifacts. A tiny BERT (hidden 32, 2 layers) and texts whose label word comes only at their end."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.models.built import (CHUNK_OVERLAP, MAX_CHUNKS, TEXT_INDEX, chunk_starts, chunks_needed, pool_chunks,
                                    text_chunks, tokenize_texts)
from workbench.predict import load_predictor
from workbench.run_paths import RunPaths
from workbench.tasks.base import EvalResult, Evaluation
from workbench.tasks.classification import ClassificationTask, pooled_cross_entropy

from conftest import FILLER, NEGATIVE, POSITIVE, minilm_dir


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def long_rows(n: int, seed: int = 0, value: bool = False) -> list[dict[str, str]]:
    """Texts of ~70 tokens (three chunks at max_length 32) whose label word (or rating) is only at the end."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        ending = " ".join([rng.choice((POSITIVE if good else NEGATIVE)[:2])] * 3)
        text = " ".join(rng.choice(FILLER) for _ in range(60)) + f" {i} " + ending
        rows.append({"text": text, "stars" if value else "label": ("9" if good else "2") if value
                     else ("pos" if good else "neg")})
    return rows


def _csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- reading a text as chunks ----------------------------------------------------------------------------

def test_a_long_text_becomes_overlapping_chunks_that_cover_every_token(tokenizer):
    text = " ".join(f"word{i}" for i in range(40))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = 32 - tokenizer.num_special_tokens_to_add(pair=False)
    (chunks,) = text_chunks(tokenizer, [text], 32)
    starts = chunk_starts(len(ids), budget)
    assert len(chunks) == len(starts) == chunks_needed(len(ids), budget) > 2
    covered = set()
    for chunk, start in zip(chunks, starts):
        assert len(chunk["input_ids"]) == 32 and chunk["attention_mask"] == [1] * 32
        assert chunk["input_ids"][0] == tokenizer.cls_token_id and chunk["input_ids"][-1] == tokenizer.sep_token_id
        assert chunk["input_ids"][1:-1] == ids[start: start + budget]
        covered |= set(range(start, start + budget))
    assert covered == set(range(len(ids)))
    assert all(b - a <= budget - int(budget * CHUNK_OVERLAP) for a, b in zip(starts, starts[1:]))  # overlap kept
    flat = tokenize_texts(tokenizer, [text, "short"], 32, "chunks")
    assert [e[TEXT_INDEX] for e in flat] == [0] * len(chunks) + [1]


def test_a_short_text_is_one_chunk_identical_to_head_truncation(tokenizer):
    texts = ["a short text", "another one that fits"]
    chunks = tokenize_texts(tokenizer, texts, 32, "chunks")
    assert [{k: v for k, v in c.items() if k != TEXT_INDEX} for c in chunks] == tokenize_texts(
        tokenizer, texts, 32, "head")
    assert [c[TEXT_INDEX] for c in chunks] == [0, 1]


def test_a_text_past_the_cap_is_read_as_max_chunks_spread_from_start_to_end(tokenizer):
    budget = 30
    assert chunks_needed(budget * 40, budget) > MAX_CHUNKS
    starts = chunk_starts(budget * 40, budget)
    assert len(starts) == MAX_CHUNKS and starts[0] == 0 and starts[-1] == budget * 40 - budget
    text = " ".join(f"word{i}" for i in range(1500))
    (chunks,) = text_chunks(tokenizer, [text], 32)
    assert len(chunks) == MAX_CHUNKS
    assert tokenizer.decode(chunks[-1]["input_ids"]).endswith("word1499 [SEP]")


def test_pooling_averages_a_texts_rows_and_leaves_one_row_per_text_alone():
    rows = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    np.testing.assert_allclose(pool_chunks(rows, [0, 0, 1], 2), [[0.7, 0.3], [0.2, 0.8]])
    assert pool_chunks(rows, [0, 1, 2], 3) is rows
    np.testing.assert_allclose(pool_chunks(np.array([1.0, 3.0, 5.0]), [1, 0, 1], 2), [3.0, 3.0])
    with pytest.raises(WorkbenchError, match="no chunk to pool"):
        pool_chunks(rows, [0, 0, 0], 2)


def test_the_eval_loss_is_the_cross_entropy_of_each_texts_averaged_probabilities():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-3.0, 1.0], [9.0, -9.0]])
    owners, labels = [0, 0, 1, 1], [0, 1]
    probs = torch.softmax(logits.double(), -1).numpy()
    expected = -np.mean([np.log(probs[:2, 0].mean()), np.log(probs[2:, 1].mean())])
    assert pooled_cross_entropy(logits, owners, labels) == pytest.approx(expected, rel=1e-9)
    plain = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1])).item()
    assert pooled_cross_entropy(logits[:2], [0, 1], [0, 1]) == pytest.approx(plain)


# --- a classification run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory, tiny_model_dir):
    from workbench.store import RunStore

    root = tmp_path_factory.mktemp("chunks")
    source = _csv(root / "long.csv", long_rows(64))
    raw = {"model": str(tiny_model_dir), "data": {"source": str(source), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1, "truncation": "chunks", "ensemble": "off"},
           "track": {"wandb": "disabled", "tensorboard": False}}
    store = RunStore(root / "home")
    record = train(Config.from_dict(raw), store=store)
    assert record["status"] == "completed", record.get("error")
    return record, store


def test_a_chunks_run_trains_on_chunks_and_reports_figures_per_text(chunk_run):
    record, _ = chunk_run
    info = record["info"]
    assert (info["train_rows"], info["eval_rows"]) == (48, 16)
    assert info["train_chunks"] == 3 * 48 and info["eval_chunks"] == 3 * 16  # ~70 tokens: three chunks of 32
    cut = info["truncation"]
    assert cut["mode"] == "chunks" and cut["texts_cut"] == 48 and cut["mean_chunks"] == 3.0
    assert cut["texts_over_cap"] == 0 and cut["mean_tokens"] == 3 * 32  # what reading a text costs
    rows = json.loads(Path(record["metrics"]["predictions_file"]).read_text())["rows"]
    assert len(rows) == 16
    assert record["metrics"]["accuracy"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in rows]))


def test_a_chunks_run_schedules_its_steps_over_every_chunk(chunk_run):
    record, store = chunk_run
    steps = store.points(record["id"], "train")
    assert len(steps) == 3 * 48 // 8  # one epoch of 144 chunks at batch 8
    assert {p["max_steps"] for p in steps} == {len(steps)}
    assert [p["step"] for p in store.points(record["id"], "eval")] == [len(steps)]  # one evaluation, at the end


def test_the_predictor_answers_each_text_with_its_chunks_mean_probabilities(chunk_run):
    from workbench.tasks.classification import Predictor

    record, store = chunk_run
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    assert isinstance(predictor, Predictor)
    texts = [r["text"] for r in long_rows(3, seed=9)] + ["great great"]
    encodings = predictor.encode(texts, predictor.max_length)
    assert [e[TEXT_INDEX] for e in encodings] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    each = []
    with torch.no_grad():
        for e in encodings:  # one chunk at a time, no padding
            batch = {k: torch.tensor([v]) for k, v in e.items() if k != TEXT_INDEX}
            each.append(torch.softmax(predictor.model(**batch).logits.float(), -1)[0].numpy())
    expected = np.stack([np.mean(each[0:3], 0), np.mean(each[3:6], 0), np.mean(each[6:9], 0), each[9]])
    np.testing.assert_allclose(predictor.probabilities(texts), expected, atol=1e-5)
    answers = predictor.predict(texts, batch_size=3)
    assert len(answers) == 4
    np.testing.assert_allclose([[a["scores"][n] for n in predictor.labels] for a in answers], expected, atol=1e-5)


def test_int8_and_onnx_artifacts_pool_chunks_like_the_run(chunk_run, tmp_path):
    from workbench.deploy.adapter import merge_adapters
    from workbench.deploy.artifacts import OnnxPredictor, TorchPredictor, export_onnx, quantize_torch, truncation_of

    record, store = chunk_run
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    assert truncation_of(predictor) == "chunks"
    merged = merge_adapters(predictor.model)
    texts = [r["text"] for r in long_rows(5, seed=3)]
    fp32 = TorchPredictor(merged, predictor.tokenizer, predictor.labels, predictor.max_length, "chunks")
    np.testing.assert_allclose(fp32.probabilities(texts), predictor.probabilities(texts), atol=1e-5)
    int8 = TorchPredictor(quantize_torch(merged), predictor.tokenizer, predictor.labels, predictor.max_length, "chunks")
    encodings = tokenize_texts(predictor.tokenizer, texts, predictor.max_length, "chunks")
    per_chunk = int8.row_probabilities(encodings)
    assert per_chunk.shape == (15, 2)
    np.testing.assert_allclose(int8.probabilities(texts), per_chunk.reshape(5, 3, 2).mean(1), atol=1e-6)
    export_onnx(merged, predictor.tokenizer, tmp_path / "m.onnx", predictor.max_length)
    onnx = OnnxPredictor(tmp_path / "m.onnx", predictor.tokenizer, predictor.labels, predictor.max_length, 1, "chunks")
    np.testing.assert_allclose(onnx.probabilities(texts), fp32.probabilities(texts), atol=1e-5)
    assert len(onnx.predict(texts)) == 5


def test_predictions_files_mask_personal_data_unless_switched_off(tmp_path):
    texts = ["write to ann@example.org about it", "nothing personal"]
    result = EvalResult(3, 1.0, 0.5, {"accuracy": 1.0})
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    for mode, shown in (("stored", "write to [EMAIL] about it"), ("off", texts[0])):
        data = SimpleNamespace(eval_texts=texts, eval_labels=[0, 1], labels=["a", "b"], mask_personal=mode)
        ClassificationTask().write_evaluation(tmp_path / mode, Evaluation(result, 1.0, probs), data)
        rows = json.loads(RunPaths(tmp_path / mode).eval_step(3).read_text())["rows"]
        assert [r["text"] for r in rows] == [shown, "nothing personal"]


# --- a regression run ---------------------------------------------------------------------------------------

def test_a_chunks_regression_run_averages_chunk_values_per_text(tmp_path, tiny_model_dir, store):
    source = _csv(tmp_path / "ratings.csv", long_rows(48, value=True))
    raw = {"task": "text-regression", "model": str(tiny_model_dir),
           "data": {"source": str(source), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1, "truncation": "chunks"},
           "track": {"wandb": "disabled", "tensorboard": False}}
    record = train(Config.from_dict(raw), store=store)
    assert record["status"] == "completed", record.get("error")
    assert (record["info"]["eval_rows"], record["info"]["eval_chunks"]) == (12, 36)
    rows = json.loads(Path(record["metrics"]["predictions_file"]).read_text())["rows"]
    assert len(rows) == 12
    predictor = load_predictor(record["id"], store.home)
    texts = [r["text"] for r in long_rows(2, seed=4, value=True)]
    encodings = predictor.encode(texts, predictor.max_length)
    with torch.no_grad():
        batch = {k: torch.tensor([e[k] for e in encodings]) for k in encodings[0] if k != TEXT_INDEX}
        raw_values = predictor.model(**batch).logits[:, 0].double().numpy()
    expected = raw_values.reshape(2, 3).mean(1) * predictor.std + predictor.mean
    np.testing.assert_allclose([a["value"] for a in predictor.predict(texts)], expected, atol=1e-5)
