"""Continued pretraining on raw text (`task: language-modeling`): the model keeps learning its own objective on
the user's text, and later runs start from what it became (`model: run:<id>`).

- Data: documents. A .txt file (or any file that is not a table) holds one document per line (UTF-8, UTF-16
  with a BOM, else Windows-1252 or latin-1); a folder holds one document per .txt file; a table (CSV, TSV, JSONL, Parquet,
  or a catalog dataset) holds one per row of its text column (data.text_column, else one named text, review,
  ...). Blank and exactly repeated documents are dropped and counted. A seeded split holds out
  data.eval_fraction of the documents (or reads data.eval_source), so no held-out text was trained on.
- Examples: each side's documents are tokenised, joined (a causal LM gets its end-of-text token between them; an
  encoder's tokenizer puts its own [CLS] ... [SEP] around each) and cut into blocks of train.max_length tokens
  (256 when left out); the last, shorter block is kept.
- Objective: an encoder learns masked-LM (BERT's recipe through transformers' DataCollatorForLanguageModeling:
  15 % of the tokens, new masks every batch), a decoder causal LM (every next token). The held-out blocks are
  masked once, with train.seed, so every evaluation scores the same masked tokens.
- Evaluation: the mean loss over every held-out predicted token and perplexity = exp(loss), at step 0 (the
  model before training, unless chat.eval_at_start is off) and after each evaluation; the best checkpoint has
  the lowest perplexity. The run's figures: perplexity_before, perplexity (the best) and improvement (the
  share of the perplexity removed: 1 - after / before).
- Reuse: when the run ends, its best model is saved with the adapters merged, as a Hugging Face directory
  (safetensors and the tokenizer) in <run>/model/pretrained/, which `model: run:<id>` loads
  (catalog.resolve_model refuses a run that is not a completed run of this task). A run answers nothing
  itself: it is a model to start from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..catalog import DATASETS, ModelSource, resolve_model
from ..config import Config, DataConfig
from ..data import FORMATS, MAX_FILE_BYTES, TEXT_NAMES, load_table, load_texts, mask_data, masked_note
from ..errors import WorkbenchError
from ..methods import float_twin
from ..models.language_model import (LanguageModel, Objective, build_language_model, check_language_model,
                                     objective_of, save_base_model)
from ..models.loading import context_limit, load_config, load_tokenizer
from ..models.state import load_trainable_state, set_seed
from ..run_paths import TASK_FILE, RunPaths
from ..task_table import spec_for
from .base import EvalResult, Evaluation
from .generation import IGNORE_INDEX, held_out_loss, pad_id_of, perplexity, write_samples

SPEC = spec_for("language_modeling:LanguageModelingTask")
DEFAULT_BLOCK = 256  # train.max_length left out: the loop's choice for a task of this kind (loop/defaults.py)
MIN_BLOCK = 2  # a block needs a token to predict from and one to predict


@dataclass
class TextData:
    """Token ids per document, split by document, and what reading did."""

    train: list[list[int]]
    eval: list[list[int]]
    source: str
    reading: str  # how the documents were found, in words
    objective: Objective
    block_size: int  # the planned train.max_length (what train_size counts blocks of)
    documents_read: int = 0
    blank_dropped: int = 0
    duplicates_dropped: int = 0
    notes: list[str] = field(default_factory=list)
    mask_personal: str = "stored"


def _stripped(source: str) -> str:
    name = source.lower()
    for ext in (".bz2", ".gz", ".xz", ".zip"):
        name = name.removesuffix(ext)
    return name


def decode_text(raw: bytes) -> str:
    """A text file's characters: UTF-8 (a BOM dropped), UTF-16 with a BOM, else Windows-1252, else latin-1
    (which decodes any byte: a Latin-1 file using the five bytes Windows-1252 leaves undefined)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16", errors="replace")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def read_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise WorkbenchError(f"text file {path.name!r} is {size >> 20} MiB, over the {MAX_FILE_BYTES >> 20} MiB "
                             "limit: split it or sample it down first")
    return path.read_bytes()


def read_documents(source: str, text_column: str | None) -> tuple[list[str], str]:
    """The documents of a data source, in order (blank ones included), and how they were read."""
    path = Path(source).expanduser()
    if source in DATASETS:
        df, _ = load_table(source)
        columns = [str(c) for c in df.columns]
        column = text_column or next((c for c in columns if c.lower() in TEXT_NAMES), None)
        if column not in columns:
            raise WorkbenchError(f"{source!r} has no text column {'named ' + repr(column) if column else 'found'}: "
                                 f"set data.text_column to one of {', '.join(columns)}")
        return [str(v) for v in df.rename(columns=str)[column].tolist()], f"the {column!r} column of {source}"
    if path.is_dir():
        if text_column is not None:
            raise WorkbenchError(f"data.text_column = {text_column!r} names a table's column, but {source!r} is a "
                                 "folder of .txt files (a document each): leave data.text_column out")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise WorkbenchError(f"folder {source!r} holds no .txt file: put a document per .txt file in it")
        docs = [decode_text(read_bytes(f)).strip() for f in files]
        return docs, f"{len(files)} .txt files of {path.name}/, a document each"
    if not path.is_file():
        raise WorkbenchError(f"data source {source!r} is neither a catalog dataset nor a file or folder: give a .txt "
                             "file (a document per line), a folder of .txt files or a table with a text column")
    if _stripped(source).endswith(tuple(FORMATS)):
        return load_texts(source, text_column), f"the text column of {path.name}"
    if text_column is not None:
        raise WorkbenchError(f"data.text_column = {text_column!r} names a table's column, but {path.name!r} is read "
                             "as plain text (a document per line): leave data.text_column out")
    return decode_text(read_bytes(path)).splitlines(), f"the lines of {path.name}, a document each"


def unique_documents(texts: list[str], data: TextData) -> list[str]:
    """The documents with blank ones and exact repeats dropped (counted in `data`)."""
    seen: set[str] = set()
    out = []
    for text in texts:
        if not text.strip():
            data.blank_dropped += 1
        elif text in seen:
            data.duplicates_dropped += 1
        else:
            seen.add(text)
            out.append(text)
    return out


def split_documents(docs: list[str], cfg: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split by document (data.eval_fraction held out), each side capped by data.max_*_samples."""
    if len(docs) < 2:
        raise WorkbenchError(f"data source {cfg.source!r} has {len(docs)} usable document(s): too few to hold some "
                             "out for the held-out perplexity; add text")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * cfg.eval_fraction)))
    held, train = [docs[i] for i in order[:n_eval]], [docs[i] for i in order[n_eval:]]
    return train[: cfg.max_train_samples], held[: cfg.max_eval_samples]


def tokenize_documents(tokenizer: Any, docs: list[str], objective: Objective) -> list[list[int]]:
    """Token ids of each document: an encoder's with its own special tokens around it, a causal LM's followed by
    its end-of-text token (where it has one), so that joined documents stay apart."""
    if not docs:
        return []
    if objective == "masked":
        return [list(ids) for ids in tokenizer(docs, verbose=False)["input_ids"]]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(ids) + end for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]]


def planned_block(config: Config, limit: int | None) -> int:
    """The block length: train.max_length (DEFAULT_BLOCK when left out), within the model's context."""
    block = config.train.max_length or DEFAULT_BLOCK
    return min(block, limit) if limit else block


def block_count(tokens: int, block: int) -> int:
    """How many blocks `tokens` joined tokens make (the last one shorter; one too short to predict is dropped)."""
    full, rest = divmod(tokens, block)
    return full + (rest >= MIN_BLOCK)


def pack(docs: list[list[int]], block: int) -> list[list[int]]:
    """The documents joined and cut into blocks of `block` tokens; the last, shorter one kept when it has a
    token to predict."""
    joined = [t for ids in docs for t in ids]
    return [joined[i: i + block] for i in range(0, len(joined), block) if len(joined[i: i + block]) >= MIN_BLOCK]


def load_text_data(config: Config, home: Path) -> TextData:
    """Read, clean, split and tokenise the documents the config names (the tokenizer only, no weights)."""
    cfg = config.data
    source = resolve_model(config.model, home, config.trust_remote_code)
    model_config = load_config(source, config.trust_remote_code)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    objective = objective_of(model_config, config.model)
    texts, reading = read_documents(cfg.source, cfg.text_column)
    data = TextData([], [], cfg.source, reading, objective, planned_block(config, context_limit(model_config)),
                    documents_read=len(texts), mask_personal=cfg.mask_personal)
    docs = unique_documents(texts, data)
    if cfg.eval_source:
        known = set(docs)
        read = unique_documents(read_documents(cfg.eval_source, cfg.text_column)[0], data)
        held = [d for d in read if d not in known]  # a held-out document is never trained on
        if len(held) < len(read):
            data.notes.append(f"dropped {len(read) - len(held)} documents of {cfg.eval_source} that are in the "
                              "training text too")
        if not held:
            raise WorkbenchError(f"eval file {cfg.eval_source!r} has no text that is not in the training text")
        train, held = docs[: cfg.max_train_samples], held[: cfg.max_eval_samples]
    else:
        train, held = split_documents(docs, cfg, config.train.seed)
    if not train:
        raise WorkbenchError(f"data source {cfg.source!r} has no text to train on")
    if cfg.mask_personal == "all":
        (train, held), counts = mask_data(train, held)
        if counts:
            data.notes.append(masked_note(counts))
    data.train = tokenize_documents(tokenizer, train, objective)
    data.eval = tokenize_documents(tokenizer, held, objective)
    return data


def count_tokens(labels: torch.Tensor) -> int:
    """The tokens a batch's loss is on (a causal LM's first label is set to IGNORE_INDEX: nothing predicts it)."""
    return int((labels != IGNORE_INDEX).sum())


def pad_labelled(encodings: list[dict], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels of examples that carry their labels."""
    width = max(len(encodings[i]["input_ids"]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encodings[i]["input_ids"])
        ids[row, :n] = torch.tensor(encodings[i]["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(encodings[i]["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mask_blocks(built: LanguageModel, blocks: list[list[int]], generator_seed: int | None) -> dict[str, torch.Tensor]:
    """Masked-LM inputs and labels of `blocks` (DataCollatorForLanguageModeling; seeded for the held-out
    blocks); a row the draw left without a masked token gets its middle ordinary token masked, so every row
    counts."""
    from transformers import DataCollatorForLanguageModeling

    collator = built.collator if generator_seed is None else DataCollatorForLanguageModeling(
        built.tokenizer, mlm=True, mlm_probability=built.collator.mlm_probability, seed=generator_seed)
    batch = collator([{"input_ids": ids} for ids in blocks])
    tokenizer = built.tokenizer
    for row, ids in enumerate(blocks):
        if (batch["labels"][row] != IGNORE_INDEX).any():
            continue
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        ordinary = [i for i, s in enumerate(special) if not s]
        if ordinary:
            at = ordinary[len(ordinary) // 2]
            batch["labels"][row, at] = ids[at]
            batch["input_ids"][row, at] = tokenizer.mask_token_id
    return batch


def causal_example(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}  # position 0 is predicted by nothing


class LanguageModelingTask:
    """The Task protocol for continued pretraining (masked LM or causal LM on raw text)."""

    name = SPEC.name
    best_metric = SPEC.best_metric
    greater_is_better = SPEC.greater_is_better
    examples = "training blocks"

    def load_data(self, config: Config, home: Path) -> TextData:
        return load_text_data(config, home)

    def train_size(self, data: TextData) -> int:
        return block_count(sum(len(d) for d in data.train), data.block_size)

    def check_model(self, config: Config, source: ModelSource, data: TextData) -> None:
        check_language_model(config, source)

    def build(self, config: Config, source: ModelSource, data: Any, total_steps: int | None) -> LanguageModel:
        return build_language_model(config, source, total_steps)

    def encode(self, config: Config, built: LanguageModel, data: TextData) -> tuple[list[dict], list[dict]]:
        block = planned_block(config, context_limit(built.model.config))
        if block != data.block_size:
            data.notes.append(f"blocks of {block} tokens, planned as {data.block_size}")
        train, held = pack(data.train, block), pack(data.eval, block)
        if not held:
            raise WorkbenchError(f"the held-out documents of {data.source!r} hold no token to predict: add text or "
                                 "raise data.eval_fraction")
        if data.objective == "causal":
            return [causal_example(ids) for ids in train], [causal_example(ids) for ids in held]
        masked = mask_blocks(built, held, config.train.seed)  # the same masks at every evaluation
        held_examples = [{"input_ids": masked["input_ids"][i, : len(ids)].tolist(),
                          "labels": masked["labels"][i, : len(ids)].tolist()} for i, ids in enumerate(held)]
        return [{"input_ids": ids} for ids in train], held_examples

    def collate(self, built: LanguageModel, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        if "labels" in examples[indices[0]]:
            return pad_labelled(examples, indices, pad_id_of(built.tokenizer))
        return mask_blocks(built, [examples[i]["input_ids"] for i in indices], None)  # new masks every batch

    def loss(self, built: LanguageModel, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss  # the model's mean over the tokens whose label is not IGNORE_INDEX

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_tokens(batch["labels"])

    def run_info(self, config: Config, built: LanguageModel, data: TextData, train: list[dict],
                 held: list[dict]) -> dict[str, Any]:
        notes = list(data.notes)
        if data.blank_dropped:
            notes.append(f"dropped {data.blank_dropped} blank documents")
        if data.duplicates_dropped:
            notes.append(f"dropped {data.duplicates_dropped} repeated documents")
        fresh = built.head_modules + built.head_params
        return {
            "task": self.name, "objective": f"{data.objective} language modelling", "data_reading": data.reading,
            "documents_read": data.documents_read, "train_documents": len(data.train),
            "eval_documents": len(data.eval), "train_rows": len(train), "eval_rows": len(held),
            "train_tokens": sum(len(d) for d in data.train), "eval_tokens": sum(len(d) for d in data.eval),
            "eval_predicted_tokens": sum(count_tokens(torch.tensor(e["labels"])) for e in held),
            "block_size": max(len(e["input_ids"]) for e in held + train), "data_notes": notes,
            "fresh_head": fresh, "head_trains": bool(fresh) and (config.method.train_head
                                                                  or config.method.spec.trains_backbone),
            "trainable_params": built.trainable_params, "total_params": built.total_params,
            "trainable_percent": round(100 * built.trainable_params / max(built.total_params, 1), 4),
            "head_modules": built.head_modules,
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}),
        }

    def eval_at_start(self, config: Config) -> bool:
        return config.chat.eval_at_start

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: LanguageModel,
                 data: TextData, held: list[dict], step: int, epoch: float) -> Evaluation:
        unwrapped = accelerator.unwrap_model(model)  # no DDP hooks: processes evaluate different blocks
        loss, tokens = held_out_loss(unwrapped, accelerator, held, config.train.effective_eval_batch_size,
                                     pad_id_of(built.tokenizer), pad_labelled, count_tokens)
        if not math.isfinite(loss):
            raise WorkbenchError(f"held-out loss is {loss} at step {step}: lower train.learning_rate")
        result = EvalResult(step, float(epoch), loss, {"perplexity": perplexity(loss)},
                            {"eval_tokens": tokens, "objective": data.objective, "labels": [],
                             "confusion_matrix": []})
        return Evaluation(result, result["perplexity"])

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: TextData) -> None:
        write_samples(run_dir, evaluation.result)

    def model_files(self, data: TextData) -> dict[str, Any]:
        return {TASK_FILE: {"task": self.name, "objective": data.objective}}

    def fit_baseline(self, config: Config, data: TextData, run_dir: Path) -> dict[str, Any] | None:
        """No classical baseline: there are no labels to predict."""
        return None

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        """The held-out perplexity before and after, and the adapted base model saved for later runs (its path
        under base_model): the one place this task writes beside the loop's files, once the best weights are
        in model/."""
        summary = {k: best[k] for k in ("step", "epoch", "eval_loss", "perplexity", "eval_tokens") if k in best}
        if first is not None and first["step"] == 0:
            summary["perplexity_before"] = first["perplexity"]
            summary["improvement"] = 1.0 - best["perplexity"] / first["perplexity"] if first["perplexity"] else 0.0
        summary["base_model"] = str(save_run_base_model(run_dir))
        return summary

    def load_predictor(self, record: dict[str, Any], home: Path) -> Any:
        raise WorkbenchError(f"run {record['id']} is a task: {self.name} run: it answers nothing itself; start a "
                             f"run from its model with model: run:{record['id']}")


def save_run_base_model(run_dir: Path) -> Path:
    """Rebuild the run's model from its stored config (a 4-bit base as floating point, so adapters can merge),
    load its best trained parameters, and save it with the adapters merged in <run>/model/pretrained/."""
    from safetensors.torch import load_file

    paths = RunPaths(run_dir)
    config = Config.load(paths.config)
    if float_twin(config.method.name) != config.method.name:
        import dataclasses

        config = dataclasses.replace(config, method=dataclasses.replace(config.method,
                                                                        name=float_twin(config.method.name)))
    home = run_dir.parents[1]  # <home>/runs/<id>
    set_seed(config.train.seed)  # a frozen fresh layer (train_head off) starts as it did in training
    built = build_language_model(config, resolve_model(config.model, home, config.trust_remote_code))
    load_trainable_state(built.model, load_file(str(paths.trainable)))
    return save_base_model(built.model, built.tokenizer, RunPaths(run_dir).pretrained)
