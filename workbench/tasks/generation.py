"""What the generation tasks (chat, seq2seq) share: conversations, the held-out split, the token-weighted
loss, held-out loss and perplexity, sample outputs, and the run's record.

An example is a conversation (seq2seq: a source turn and a target turn). The loss is token-weighted: each
micro-batch's mean loss counts by its share of the step's loss tokens (all processes together), so
accumulation and uneven batches give exactly the gradient of one big batch where every answer token counts
once. Evaluation is the mean loss over every held-out loss token and perplexity exp(loss), plus what the
task generates (sample answers; seq2seq: every output, scored by BLEU and chrF). With `chat.eval_at_start`
the first evaluation is at step 0: the base model's figures. The best checkpoint has the lowest held-out loss.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..catalog import ModelSource, resolve_model
from ..config import Config, DataConfig
from ..errors import WorkbenchError
from ..models.generation import GenerationModel
from ..models.state import load_trainable_state, set_seed
from .base import EvalResult, Evaluation
from ..run_paths import RunPaths, TASK_FILE, TRAINABLE_FILE

IGNORE_INDEX = -100  # the label transformers' loss skips
SAMPLE_CHARS = 2000  # a logged sample's question, reference and answer are cut here


Conversation = list[dict[str, str]]


@dataclass
class ChatData:
    """Conversations for training and held-out evaluation, and what loading did to them."""

    train: list[Conversation]
    eval: list[Conversation]
    source: str
    format: str  # "prompt/answer" or "messages"
    columns: dict[str, str]
    rows_read: int = 0
    blank_dropped: int = 0
    duplicates_dropped: int = 0
    notes: list[str] = field(default_factory=list)


def text_of(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def prompt_and_reference(conv: Conversation) -> tuple[Conversation, str]:
    """The conversation up to its last answer, and that answer."""
    last = max(i for i, t in enumerate(conv) if t["role"] == "assistant")
    return conv[:last], conv[last]["content"]


def _prompt_key(conv: Conversation) -> str:
    """What the model is asked: every turn before the last answer (for a pair, the question)."""
    prompt, _ = prompt_and_reference(conv)
    return "\n".join(f"{t['role']}: {t['content'].strip().lower()}" for t in prompt)


def split_conversations(convs: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split where conversations asking the same thing land on one side."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(convs):
        groups.setdefault(_prompt_key(c), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    want = max(1, round(len(convs) * fraction))
    held: list[int] = []
    for k in keys:
        if len(held) >= want:
            break
        held.extend(groups[k])
    held_set = set(held)
    train = [convs[i] for i in range(len(convs)) if i not in held_set]
    return train, [convs[i] for i in held]


def _cap(convs: list[Conversation], cap: int | None, seed: int) -> list[Conversation]:
    if cap is None or cap >= len(convs):
        return convs
    return random.Random(seed).sample(convs, cap)


def split_and_cap(items: list[Conversation], held: list[Conversation] | None, cfg: DataConfig, seed: int,
                  what: str, prompt: str, rows: str) -> tuple[list[Conversation], list[Conversation]]:
    """Training and held-out items of a generation task, capped: the eval file's (`held`), else a seeded split
    of `items` that keeps every copy of a prompt on one side. The words name the task's items in messages
    (chat: conversation / question / question/answer; seq2seq: source/target pair / source / source/target)."""
    if held is not None:
        if not held:
            raise WorkbenchError(f"eval file {cfg.eval_source!r} has no usable {rows} rows")
        train = items
    else:
        if len(items) < 2:
            raise WorkbenchError(f"data source {cfg.source!r} has {len(items)} usable {what}(s): too few to hold "
                                 "some out for evaluation; add rows")
        train, held = split_conversations(items, cfg.eval_fraction, seed)
        if not train:
            raise WorkbenchError(f"data source {cfg.source!r}: every {what} has the same {prompt}, so none is left "
                                 "to train on once some are held out; add rows or lower data.eval_fraction")
    train, held = _cap(train, cfg.max_train_samples, seed), _cap(held, cfg.max_eval_samples, seed)
    if not train:
        raise WorkbenchError(f"data source {cfg.source!r} has no usable {rows} rows")
    return train, held


def encode_all(encoder: Any, convs: list[Conversation], what: str) -> tuple[list[dict], int]:
    """Encodings of the conversations whose answers survive truncation, and how many were dropped."""
    out = [e for e in (encoder.encode(c) for c in convs) if e is not None]
    if not out:
        raise WorkbenchError(f"no {what} answer fits in train.max_length = {encoder.max_length} tokens after its "
                             "prompt: raise train.max_length")
    return out, len(convs) - len(out)


def answer_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is on: labels are shifted by one (position 0 predicts nothing)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def generation_result(step: int, epoch: float, loss: float, tokens: int, samples: list[dict[str, str]],
                      scores: dict[str, float]) -> EvalResult:
    """One chat or seq2seq evaluation: held-out loss per answer token, perplexity, corpus scores (seq2seq:
    BLEU, chrF) and sample answers. No classes: the labels and matrix stay empty for the viewers."""
    lines = []
    for s in samples[:1]:
        if "translation" in s:  # task seq2seq
            lines.append(f"  source: {s['source'][:120]}\n  output: {s['translation'][:240]}")
        else:
            lines.append(f"  Q: {s['question'][:120]}\n  A: {s['answer'][:240]}")
    return EvalResult(step, float(epoch), float(loss), {"perplexity": perplexity(loss), **scores},
                      {"eval_tokens": tokens, "samples": samples, "labels": [], "confusion_matrix": []}, lines=lines)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, accelerator: Any, encodings: list[dict], batch_size: int,
                  pad_id: int, collate: Callable[..., dict[str, torch.Tensor]],
                  count: Callable[[torch.Tensor], int] = answer_tokens) -> tuple[float, int]:
    """Mean loss over every held-out answer token (all processes together), and the token count."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(encodings), world))
    mine.sort(key=lambda i: len(encodings[i]["input_ids"]))  # similar lengths together: less padding, same sum
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens
    for start in range(0, len(mine), batch_size):
        batch = collate(encodings, mine[start: start + batch_size], pad_id)
        n = count(batch["labels"])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = model(**batch).loss.double()
        total += torch.stack([loss * n, torch.tensor(float(n), dtype=torch.float64, device=accelerator.device)])
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


def sample_conversations(convs: list[Conversation], k: int) -> list[Conversation]:
    """The first k held-out conversations with distinct questions (the split already shuffled them)."""
    picked, seen = [], set()
    for c in convs:
        q = prompt_and_reference(c)[0][-1]["content"].strip().lower()
        if q not in seen:
            seen.add(q)
            picked.append(c)
        if len(picked) == k:
            break
    return picked


def rebuild_generation_run(record: dict[str, Any], home: Path,
                           build: Callable[[Config, ModelSource], GenerationModel]) -> tuple[Config, GenerationModel]:
    """A generation run's config and model: `build` (base weights, same seed) + the run's trained parameters."""
    from safetensors.torch import load_file

    model_dir = RunPaths.of(record).model
    if not (model_dir / TRAINABLE_FILE).is_file():
        raise WorkbenchError(f"run {record['id']} has no trained model yet (status {record['status']}): "
                             "wait until it completes an evaluation, or pick another run")
    config = Config.from_dict(record["config"])
    set_seed(config.train.seed)
    built = build(config, resolve_model(config.model, home, config.trust_remote_code))
    load_trainable_state(built.model, load_file(str(model_dir / TRAINABLE_FILE)))
    return config, built


def write_samples(run_dir: Path, result: EvalResult) -> None:
    """The evaluation's figures and sample answers, as <run>/eval/step-N.json."""
    out = RunPaths(run_dir).eval
    out.mkdir(exist_ok=True)
    tmp = out / f"step-{result.step}.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in result.summary().items() if k not in ("labels", "confusion_matrix")},
                              indent=1))
    tmp.replace(out / f"step-{result.step}.json")


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class GenerationTask:
    """The Task protocol for a generation task; a subclass supplies its data, model, encoder, batches, loss
    tokens and generated outputs (chat.py, seq2seq.py)."""

    name = "generation"
    best_metric = "eval_loss"
    greater_is_better = False
    examples = "training conversations"

    # --- what a subclass supplies -------------------------------------------------------------------
    def read(self, cfg: DataConfig, seed: int) -> ChatData:
        raise NotImplementedError

    def check(self, config: Config, source: ModelSource, data: ChatData | None) -> None:
        raise NotImplementedError

    def build_model(self, config: Config, source: ModelSource, data: ChatData | None) -> GenerationModel:
        raise NotImplementedError

    def encoder(self, tokenizer: Any, max_length: int) -> Any:
        """An object with encode(conversation) -> ids and labels (or None) and a prompt_format."""
        raise NotImplementedError

    def collate_examples(self, encodings: list[dict], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count(self, labels: torch.Tensor) -> int:
        """The tokens a batch's loss is on."""
        return answer_tokens(labels)

    def outputs(self, model: torch.nn.Module, encoder: Any, held: list[Conversation], samples: list[Conversation],
                config: Config) -> tuple[list[dict[str, str]], dict[str, float]]:
        """(sample outputs, corpus scores) of an evaluation, on the main process."""
        raise NotImplementedError

    # --- the Task protocol --------------------------------------------------------------------------
    def load_data(self, config: Config, home: Path) -> ChatData:
        return self.read(config.data, config.train.seed)

    def train_size(self, data: ChatData) -> int:
        return len(data.train)

    def check_model(self, config: Config, source: ModelSource, data: ChatData) -> None:
        self.check(config, source, data)

    def build(self, config: Config, source: ModelSource, data: ChatData, total_steps: int | None) -> GenerationModel:
        built = self.build_model(config, source, data)
        built.encoder = self.encoder(built.tokenizer, config.train.max_length)
        return built

    def encode(self, config: Config, built: GenerationModel, data: ChatData) -> tuple[list[dict], list[dict]]:
        train_enc, train_cut = encode_all(built.encoder, data.train, "training")
        eval_enc, eval_cut = encode_all(built.encoder, data.eval, "held-out")
        if train_cut or eval_cut:
            data.notes.append(f"dropped {train_cut} training and {eval_cut} held-out conversations whose answer "
                              f"starts beyond train.max_length = {config.train.max_length} tokens")
        return train_enc, eval_enc

    def collate(self, built: GenerationModel, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collate_examples(examples, indices, pad_id_of(built.tokenizer))

    def loss(self, built: GenerationModel, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss  # the model's mean over the tokens whose label is not IGNORE_INDEX

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return self.count(batch["labels"])

    def run_info(self, config: Config, built: GenerationModel, data: ChatData, train: list[dict],
                 held: list[dict]) -> dict[str, Any]:
        return {
            "task": self.name,
            "train_rows": len(train),
            "eval_rows": len(held),
            "train_answer_tokens": sum(self.count(torch.tensor([e["labels"]])) for e in train),
            "eval_answer_tokens": sum(self.count(torch.tensor([e["labels"]])) for e in held),
            "data_format": data.format,
            "data_columns": data.columns,
            "prompt_format": built.encoder.prompt_format,
            "data_notes": data.notes + ([f"dropped {data.blank_dropped} rows with a blank question or answer"]
                                        if data.blank_dropped else [])
            + ([f"dropped {data.duplicates_dropped} duplicate conversations"] if data.duplicates_dropped else []),
            "trainable_params": built.trainable_params,
            "total_params": built.total_params,
            "trainable_percent": round(100 * built.trainable_params / max(built.total_params, 1), 4),
            "head_modules": [],
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}),
        }

    def eval_at_start(self, config: Config) -> bool:
        return config.chat.eval_at_start

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: GenerationModel,
                 data: ChatData, held: list[dict], step: int, epoch: float) -> Evaluation:
        unwrapped = accelerator.unwrap_model(model)  # no DDP hooks: processes evaluate different rows
        loss, tokens = held_out_loss(unwrapped, accelerator, held, config.train.effective_eval_batch_size,
                                     pad_id_of(built.tokenizer), self.collate_examples, self.count)
        if not math.isfinite(loss):
            raise WorkbenchError(f"held-out loss is {loss} at step {step}: lower train.learning_rate")
        # generation on the main process only: its outputs go to the store, which only it writes
        samples = sample_conversations(data.eval, config.chat.sample_prompts)
        answers, scores = (self.outputs(unwrapped, built.encoder, data.eval, samples, config)
                           if accelerator.is_main_process else ([], {}))
        result = generation_result(step, epoch, loss, tokens, answers, scores)
        return Evaluation(result, loss)

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: ChatData) -> None:
        write_samples(run_dir, evaluation.result)

    def model_files(self, data: ChatData) -> dict[str, Any]:
        return {TASK_FILE: {"task": self.name}}

    def fit_baseline(self, config: Config, data: ChatData, run_dir: Path) -> dict[str, Any] | None:
        """No classical baseline for generated text (a TF-IDF model cannot write an answer)."""
        return None

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        keep = ("step", "epoch", "eval_loss", "perplexity", "bleu", "chrf", "eval_tokens", "samples")
        summary = {k: best[k] for k in keep if k in best}
        summary["samples_file"] = str(RunPaths(run_dir).eval_step(best['step']))
        if first is not None and first["step"] == 0:
            summary["start_eval_loss"], summary["start_perplexity"] = first["eval_loss"], first["perplexity"]
        return summary
