"""Chat tuning (`task: chat`): a causal LM learns to answer, with the loss on the answers only.

- Data: question/answer pairs (the `chatterbot` catalog set, or a CSV/TSV/JSONL/Parquet file with
  prompt/answer columns) or OpenAI-style conversations (a `messages` column of [{role, content}, ...]).
  Exact duplicates and blank rows are dropped and counted; the held-out split keeps every copy of a
  question on one side (chatterbot asks "What is AI?" several times), drawn with train.seed.
- Tokens: the tokenizer's own chat template renders each conversation (a plain "role: text" template
  when it has none). Labels are -100 everywhere except the assistant turns' tokens (their text and the
  end-of-turn token that teaches the model to stop), found by rendering each turn's prefix with and
  without it: no template-specific markers are hard-coded.
- Loss: token-weighted. Each micro-batch's mean loss is weighted by its share of the optimiser step's
  answer tokens (all processes together), so accumulation and uneven batches give exactly the gradient
  of one big batch, where every answer token counts once (a per-example weighting would count a token
  of a short answer more than one of a long answer).
- Evaluation: held-out loss (the mean over every held-out answer token) and perplexity exp(loss), plus
  greedy answers to `chat.sample_prompts` held-out questions at each evaluation (in the eval point of
  the run store and in <run>/eval/step-N.json). With `chat.eval_at_start` the first evaluation is at
  step 0: the base model's figures. Early stopping and the best checkpoint follow the held-out loss.
- Methods: full, lora and qlora (bitsandbytes nf4 base, its CPU repack trap disarmed). Adapters go on
  every linear layer but the output embedding (`auto`: the attention and MLP projections).

`workbench.trainer.train` delegates here for the generation tasks (chat, and seq2seq in
workbench.seq2seq). `train_generation` has the same shape and uses the same pieces as the classification
loop (Accelerator, epoch order, shards, checkpoints with exact resume, signals, stop requests, store points
and events); a `GenerationTask` supplies what differs between the tasks: data, model, encoder, batches,
the tokens the loss is on, and the generated outputs (and scores) of an evaluation.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .callbacks import Callback, CallbackList, EvalResult, TrainControl, TrainState
from .catalog import DATASETS, ModelSource, hub_error, resolve_model
from .config import Config, DataConfig
from .errors import StopRequested, WorkbenchError
from .store import RunStore
from .tracking import ConsoleCallback, StoreCallback, TensorBoardCallback, WandbCallback

IGNORE_INDEX = -100  # the label transformers' loss skips
ROLES = ("system", "user", "assistant")
PROMPT_NAMES = ("prompt", "question", "instruction", "input", "query", "user", "text")
ANSWER_NAMES = ("completion", "answer", "response", "output", "reply", "assistant", "target")
MESSAGES_NAMES = ("messages", "conversation", "conversations", "chat", "dialog", "dialogue")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")  # newlines as expressions: trim_blocks
SAMPLE_CHARS = 2000  # a logged sample's question, reference and answer are cut here


Conversation = list[dict[str, str]]


# --- data -------------------------------------------------------------------------------------------

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


def detect_chat_columns(columns: list[str], cfg: DataConfig) -> dict[str, str]:
    """{'messages': col} or {'prompt': col, 'answer': col}: the configured names, else by name."""
    found = ", ".join(columns) or "none"
    for name in ("messages_column", "prompt_column", "answer_column"):
        given = getattr(cfg, name)
        if given is not None and given not in columns:
            raise WorkbenchError(f"data.{name} = {given!r} not found: columns found are {found}")
    if cfg.messages_column:
        return {"messages": cfg.messages_column}
    lower = {c.lower(): c for c in columns}
    if not (cfg.prompt_column or cfg.answer_column):
        messages = next((lower[n] for n in MESSAGES_NAMES if n in lower), None)
        if messages is not None:
            return {"messages": messages}
    prompt = cfg.prompt_column or next((lower[n] for n in PROMPT_NAMES if n in lower), None)
    answer = cfg.answer_column or next((lower[n] for n in ANSWER_NAMES if n in lower and lower[n] != prompt), None)
    if prompt is None:
        raise WorkbenchError(f"no prompt column detected: columns found are {found} (set data.prompt_column, "
                             "or data.messages_column for conversations)")
    if answer is None:
        raise WorkbenchError(f"no answer column detected: columns found are {found} (set data.answer_column, "
                             "or data.messages_column for conversations)")
    if prompt == answer:
        raise WorkbenchError(f"data.prompt_column and data.answer_column are both {prompt!r}: "
                             "questions and answers need their own columns")
    return {"prompt": prompt, "answer": answer}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def check_messages(value: Any, where: str) -> Conversation:
    """One OpenAI-style conversation, validated: roles, text content, a user turn first, an answer."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise WorkbenchError(f"{where}: the messages are not a JSON list of {{role, content}} objects") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise WorkbenchError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out: Conversation = []
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise WorkbenchError(f"{where}: every message needs a 'role' and a 'content' (got {str(turn)[:80]})")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise WorkbenchError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise WorkbenchError(f"{where}: a {role} message's content must be text (got {type(content).__name__})")
        out.append({"role": role, "content": content})
    speaking = [t for t in out if t["role"] != "system"]
    if not speaking or speaking[0]["role"] != "user":
        raise WorkbenchError(f"{where}: the first message after any system message must be the user's")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in out):
        raise WorkbenchError(f"{where}: no assistant message with text: nothing to learn from")
    return out


def _conversations(df: Any, columns: dict[str, str], where: str, report: ChatData) -> list[Conversation]:
    """Conversations from a table: messages rows are validated, prompt/answer rows become two turns."""
    convs: list[Conversation] = []
    if "messages" in columns:
        for i, value in enumerate(df[columns["messages"]].tolist()):
            convs.append(check_messages(value, f"{where} row {i + 1}"))
        report.rows_read += len(convs)
    else:
        prompts, answers = df[columns["prompt"]].map(_text).tolist(), df[columns["answer"]].map(_text).tolist()
        report.rows_read += len(prompts)
        if prompts and not any(a.strip() for a in answers):
            raise WorkbenchError(f"{where}: every answer in column {columns['answer']!r} is empty: "
                                 "a chat model learns from the answers")
        for p, a in zip(prompts, answers):
            if not p.strip() or not a.strip():
                report.blank_dropped += 1
                continue
            convs.append([{"role": "user", "content": p}, {"role": "assistant", "content": a}])
    seen: set[str] = set()
    unique: list[Conversation] = []
    for c in convs:
        key = json.dumps(c, sort_keys=True)
        if key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        unique.append(c)
    return unique


def _read_table(source: str) -> Any:
    from .data import load_table

    if source == "chatterbot":
        from .data import load_chatterbot_pairs

        import pandas as pd

        return pd.DataFrame(load_chatterbot_pairs())
    if source in DATASETS:
        raise WorkbenchError(f"dataset {source!r} holds labelled texts, not questions and answers: task chat "
                             "needs chatterbot, or a file with prompt/answer columns or a messages column")
    df, _ = load_table(source)
    return df


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


def load_chat_data(cfg: DataConfig, seed: int) -> ChatData:
    """Load, validate, de-duplicate and split the conversations the config names."""
    df = _read_table(cfg.source)
    if df.empty:
        raise WorkbenchError(f"data source {cfg.source!r} has no rows: add question/answer rows")
    columns = detect_chat_columns([str(c) for c in df.columns], cfg)
    df = df.rename(columns=str)
    data = ChatData([], [], cfg.source, "messages" if "messages" in columns else "prompt/answer", columns)
    convs = _conversations(df, columns, f"data source {cfg.source!r}", data)
    held = None
    if cfg.eval_source:
        eval_df = _read_table(cfg.eval_source).rename(columns=str)
        held = _conversations(eval_df, detect_chat_columns(list(eval_df.columns), cfg),
                              f"eval file {cfg.eval_source!r}", ChatData([], [], "", "", {}))
    data.train, data.eval = split_and_cap(convs, held, cfg, seed, "conversation", "question", "question/answer")
    return data


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


# --- tokens and labels --------------------------------------------------------------------------------

class ChatEncoder:
    """Renders conversations with the chat template and makes answer-only labels."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise WorkbenchError("task chat needs a fast tokenizer (offsets locate the answers): this model's "
                                 "tokenizer is a slow one; save it with tokenizer.json")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE

    @property
    def prompt_format(self) -> str:
        return "chat template" if self.template is None else "plain 'role: text' (the tokenizer has no chat template)"

    def render(self, messages: Conversation, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.template)

    def answer_spans(self, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn in it.

        A turn's span starts where the prompt before it (rendered with the generation prompt) ends, and ends
        after its end-of-turn marker (trailing whitespace is the template's, never generated).
        """
        full = self.render(messages)
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise WorkbenchError("this model's chat template renders a turn differently once later turns "
                                     "follow, so the answer tokens cannot be located: use single-turn "
                                     "prompt/answer rows or another model")
            spans.append((len(before), len(upto.rstrip())))
        return full, spans

    def encode(self, messages: Conversation) -> dict[str, list[int]] | None:
        """input_ids, attention_mask and labels (-100 but on answer tokens); None if truncation left no answer."""
        full, spans = self.answer_spans(messages)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                             max_length=self.max_length)
        ids = list(enc["input_ids"])
        labels = [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
        if not any(lab != IGNORE_INDEX for lab in labels[1:]):  # position 0 is never predicted
            return None
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def prompt_ids(self, messages: Conversation) -> list[int]:
        """Token ids of a prompt ready for generation: the conversation so far plus the assistant's cue."""
        text = self.render(messages, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_and_reference(conv: Conversation) -> tuple[Conversation, str]:
    """The conversation up to its last answer, and that answer."""
    last = max(i for i, t in enumerate(conv) if t["role"] == "assistant")
    return conv[:last], conv[last]["content"]


def encode_all(encoder: ChatEncoder, convs: list[Conversation], what: str) -> tuple[list[dict], int]:
    """Encodings of the conversations whose answers survive truncation, and how many were dropped."""
    out = [e for e in (encoder.encode(c) for c in convs) if e is not None]
    if not out:
        raise WorkbenchError(f"no {what} answer fits in train.max_length = {encoder.max_length} tokens after its "
                             "prompt: raise train.max_length")
    return out, len(convs) - len(out)


def collate_chat(encodings: list[dict[str, list[int]]], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has attention 0 and label -100."""
    width = max(len(encodings[i]["input_ids"]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        e = encodings[i]
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is on: labels are shifted by one (position 0 predicts nothing)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def accumulate_token_gradients(model: torch.nn.Module, accelerator: Any, micro_batches: list[dict[str, torch.Tensor]],
                               count: Callable[[torch.Tensor], int] = answer_tokens) -> torch.Tensor:
    """Backward over one optimiser step's micro-batches; returns the step's loss per answer token.

    A micro-batch's loss is the mean over its answer tokens; weighting it by its share of the step's answer
    tokens (every process's, for DDP, which then averages gradients over processes) gives the gradient and
    loss of one big batch, token-weighted, whatever the accumulation and however the tokens fall.
    """
    import contextlib

    counts = [count(b["labels"]) for b in micro_batches]
    if min(counts) == 0:
        raise RuntimeError("a micro-batch without answer tokens (encode drops such examples)")
    world = accelerator.num_processes
    total = torch.tensor(float(sum(counts)), device=accelerator.device)
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")  # sync point: every process's answer tokens
    total_tokens = float(total.item())
    step_loss = torch.zeros((), device=accelerator.device)
    for m, (batch, n) in enumerate(zip(micro_batches, counts)):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # no gradient all-reduce until the last micro-batch of the step
        sync = accelerator.no_sync(model) if m < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                scaled = model(**batch).loss * (n * world / total_tokens)
            accelerator.backward(scaled)
        step_loss += scaled.detach().float() / world
    return step_loss  # summed over processes, it is the step's loss per answer token


# --- the model --------------------------------------------------------------------------------------

@dataclass
class ChatModel:
    """A causal LM ready to train or answer, its tokenizer, and what the method did."""

    model: torch.nn.Module
    tokenizer: Any
    target_modules: list[str]
    trainable_params: int
    total_params: int
    output_module: str


def _output_module(model: torch.nn.Module) -> str:
    out = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is out), "lm_head")


def check_chat_model(config: Config, source: ModelSource) -> None:
    """The model checks that need no weights: a causal LM, the context length, adapter targets, bitsandbytes."""
    from transformers import AutoModelForCausalLM

    from .methods import load_config
    from .zeroshot import architecture, is_causal_lm

    model_config = load_config(source, config.trust_remote_code)
    if not is_causal_lm(model_config):
        raise WorkbenchError(f"task chat needs a causal language model such as smollm2-135m-instruct: model "
                             f"{config.model!r} is {architecture(model_config)}, which cannot generate text")
    check_generation_method(config, model_config, AutoModelForCausalLM)


def check_generation_method(config: Config, model_config: Any, auto_class: Any) -> None:
    """Weight-free checks both generation tasks share: the context length, the adapter targets (on a meta
    skeleton of `auto_class`), bitsandbytes for qlora."""
    from .methods import _check_context, resolve_targets

    _check_context(config, model_config)
    if config.method.uses_adapters:
        with torch.device("meta"):
            skeleton = auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code)
        resolve_targets(skeleton, config.method, [_output_module(skeleton)])
    if config.method.name == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError("method qlora needs bitsandbytes: pip install bitsandbytes") from None


def build_chat_model(config: Config, source: ModelSource) -> ChatModel:
    """Load the causal LM and apply full, lora or qlora (adapters on every linear layer but the output)."""
    from transformers import AutoModelForCausalLM

    from .methods import load_tokenizer, quiet_libraries

    quiet_libraries()
    check_chat_model(config, source)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    return load_generation_model(config, source, tokenizer, AutoModelForCausalLM, "CAUSAL_LM")


def load_generation_model(config: Config, source: ModelSource, tokenizer: Any, auto_class: Any, task_type: str,
                          prepare: Callable[[torch.nn.Module], None] | None = None) -> ChatModel:
    """Load a generation model (`auto_class`: causal LM or seq2seq) and apply full, lora or qlora.

    The one loader of both generation tasks: fp32 weights (qlora: a 4-bit backbone, the output layer in full
    precision), the pad token set from the tokenizer, `prepare(model)` for what a task adds (the decoder
    start, a forced first token), then adapters on every linear layer but the output (peft `task_type`).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    from .methods import _bnb_config, count_parameters, disable_bnb_inference_repack, load_kwargs, resolve_targets

    method = config.method
    kwargs = load_kwargs(source, config.trust_remote_code)
    kwargs["dtype"] = torch.float32
    if method.name == "qlora":
        kwargs["quantization_config"] = _bnb_config(method, ["lm_head"])  # the output layer stays full precision
    try:
        model = auto_class.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        if source.origin == "hub":
            raise hub_error(source.name, exc) from None
        raise WorkbenchError(f"model {source.name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if prepare is not None:
        prepare(model)
    output = _output_module(model)
    targets: list[str] = []
    if method.name == "full":
        model.requires_grad_(True)
    else:
        if method.name == "qlora":
            disable_bnb_inference_repack(model)  # TRAPS.md: else LoRA gradients vanish after an eval pass
        targets = resolve_targets(model, method, [output])
        model = get_peft_model(model, LoraConfig(
            task_type=getattr(TaskType, task_type), r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=list(targets), use_rslora=method.use_rslora, use_dora=method.use_dora))
    trainable, total = count_parameters(model)
    return ChatModel(model, tokenizer, targets, trainable, total, output)


# --- evaluation -------------------------------------------------------------------------------------

@dataclass
class ChatEvalResult(EvalResult):
    """One chat evaluation: held-out loss per answer token, perplexity, and sample answers.

    The classification fields are empty (accuracy and f1_macro NaN): a chat model has no classes.
    """

    perplexity: float = float("nan")
    eval_tokens: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # task seq2seq: corpus BLEU and chrF

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "eval_loss": self.eval_loss, "perplexity": self.perplexity,
                **self.scores, "eval_tokens": self.eval_tokens, "samples": self.samples,
                "labels": [], "confusion_matrix": []}  # empty: viewers of classification runs show nothing


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, accelerator: Any, encodings: list[dict], batch_size: int,
                  pad_id: int, collate: Callable[..., dict[str, torch.Tensor]] = collate_chat,
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


def generation_kwargs(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding that stops at the end of the answer."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
            "top_k": None, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


@torch.no_grad()
def generate_answer(model: torch.nn.Module, encoder: ChatEncoder, messages: Conversation, max_new_tokens: int,
                    streamer: Any = None, stopping: Any = None) -> str:
    """Greedy answer of the model to a conversation that ends with a user turn."""
    ids = encoder.prompt_ids(messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=streamer, stopping_criteria=stopping,
                             **generation_kwargs(encoder.tokenizer, max_new_tokens))
    finally:
        model.train(was_training)
    return encoder.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def sample_answers(model: torch.nn.Module, encoder: ChatEncoder, convs: list[Conversation],
                   max_new_tokens: int) -> list[dict[str, str]]:
    """The model's answers to held-out questions, next to the reference answers."""
    out = []
    for conv in convs:
        prompt, reference = prompt_and_reference(conv)
        out.append({"question": prompt[-1]["content"][:SAMPLE_CHARS], "reference": reference[:SAMPLE_CHARS],
                    "answer": generate_answer(model, encoder, prompt, max_new_tokens)[:SAMPLE_CHARS]})
    return out


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


# --- trackers: the chat figures instead of accuracy ---------------------------------------------------

class ChatConsoleCallback(ConsoleCallback):
    """Progress lines; an evaluation prints loss, perplexity and the first sample answer."""

    def on_evaluate(self, state: TrainState, control: TrainControl, result: EvalResult) -> None:
        scores = "".join(f" {k} {v:.2f}" for k, v in getattr(result, "scores", {}).items())
        self._print(f"eval step {result.step}: eval_loss {result.eval_loss:.4f} perplexity "
                    f"{getattr(result, 'perplexity', float('nan')):.2f}{scores}"
                    + (" (best)" if state.best_step == result.step else ""))
        for s in getattr(result, "samples", [])[:1]:
            if "translation" in s:  # task seq2seq
                self._print(f"  source: {s['source'][:120]}\n  output: {s['translation'][:240]}")
            else:
                self._print(f"  Q: {s['question'][:120]}\n  A: {s['answer'][:240]}")


class ChatTensorBoardCallback(TensorBoardCallback):
    def on_evaluate(self, state: TrainState, control: TrainControl, result: EvalResult) -> None:
        self.writer.add_scalar("eval/loss", result.eval_loss, state.global_step)
        self.writer.add_scalar("eval/perplexity", getattr(result, "perplexity", float("nan")), state.global_step)
        for name, value in getattr(result, "scores", {}).items():
            self.writer.add_scalar(f"eval/{name}", value, state.global_step)


class ChatWandbCallback(WandbCallback):
    def on_evaluate(self, state: TrainState, control: TrainControl, result: EvalResult) -> None:
        self.run.log({"eval/loss": result.eval_loss, "eval/perplexity": getattr(result, "perplexity", None),
                      **{f"eval/{k}": v for k, v in getattr(result, "scores", {}).items()}}, step=state.global_step)


def chat_callbacks(config: Config, store: RunStore, run_id: str) -> list[Callback]:
    """As tracking.default_callbacks: the store first, then the console and trackers, with chat figures."""
    run_dir = store.run_dir(run_id)
    callbacks: list[Callback] = [StoreCallback(store, run_id), ChatConsoleCallback()]
    if config.track.tensorboard:
        callbacks.append(ChatTensorBoardCallback(str(run_dir / "tensorboard")))
    if config.track.wandb != "disabled":
        callbacks.append(ChatWandbCallback(config.track.wandb, config.track.project, str(run_dir), run_id))
    return callbacks


# --- the generation tasks ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationTask:
    """What `train_generation` asks of a task; examples are conversations (seq2seq: source turn, target turn)."""

    name: str
    load_data: Callable[[DataConfig, int], ChatData]
    check_model: Callable[[Config, ModelSource], None]
    build_model: Callable[[Config, ModelSource], ChatModel]
    encoder: Callable[[Any, int], Any]  # (tokenizer, max_length) -> an object with encode(conv) and prompt_format
    collate: Callable[[list[dict], list[int], int], dict[str, torch.Tensor]]
    count: Callable[[torch.Tensor], int]  # the tokens a batch's loss is on
    # (model, encoder, held-out conversations, sample conversations, config) -> (samples, scores)
    outputs: Callable[[torch.nn.Module, Any, list[Conversation], list[Conversation], Config],
                      tuple[list[dict[str, str]], dict[str, float]]]


def _chat_outputs(model: torch.nn.Module, encoder: ChatEncoder, held: list[Conversation],
                  samples: list[Conversation], config: Config) -> tuple[list[dict[str, str]], dict[str, float]]:
    return sample_answers(model, encoder, samples, config.chat.max_new_tokens), {}


def generation_task(name: str) -> GenerationTask:
    """The pieces of task `name` (chat here; seq2seq in workbench.seq2seq)."""
    if name == "seq2seq":
        from .seq2seq import SEQ2SEQ

        return SEQ2SEQ
    if name != "chat":
        raise WorkbenchError(f"task {name!r} is not a generation task: chat or seq2seq")
    return GenerationTask("chat", load_chat_data, check_chat_model, build_chat_model, ChatEncoder, collate_chat,
                          answer_tokens, _chat_outputs)


# --- checks before a run ----------------------------------------------------------------------------

def preflight_generation(config: Config, home: Path) -> ChatData:
    """Every check that needs no weights (chat or seq2seq): data, columns, examples, model kind, limits, targets."""
    task = generation_task(config.task)
    data = task.load_data(config.data, config.train.seed)
    _check_batch_fits(config, data, 1)
    task.check_model(config, resolve_model(config.model, home, config.trust_remote_code))
    return data


preflight_chat = preflight_generation  # the name task chat has always used


def _check_batch_fits(config: Config, data: ChatData, world: int) -> None:
    if config.train.batch_size * world > len(data.train):
        raise WorkbenchError(
            f"train.batch_size = {config.train.batch_size} x {world} process(es) is larger than the "
            f"{len(data.train)} training conversations: lower train.batch_size or add data")


# --- the loop ---------------------------------------------------------------------------------------

def train_generation(config: Config, store: RunStore | None = None, run_id: str | None = None,
                     callbacks: list[Callback] | None = None, resume: bool = False) -> dict[str, Any]:
    """Tune a generation model (task chat or seq2seq) to the end (completed, stopped or failed); returns the record."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from .kernels import use_fast_dropout
    from .methods import enable_gradient_checkpointing
    from .trainer import (INTERNAL_ERROR, Progress, _install_sigterm, _log_traceback, _restore_sigterm,
                          _save_stop_checkpoint, _stop_everywhere, _sync_state, _timings, epoch_order,
                          latest_checkpoint, load_checkpoint, set_seed, shard_batches)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if config.train.precision == "bf16" else "no")
    main = accelerator.is_main_process
    previous_threads = torch.get_num_threads()  # restored at the end: a notebook kernel keeps its own
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    store = store or RunStore()
    if main:
        run_id = store.create_run(config.to_dict(), config.name) if run_id is None else store.resolve(run_id)
        store.mark_running(run_id, os.getpid())
    run_id = broadcast_object_list([run_id])[0] if accelerator.num_processes > 1 else run_id
    run_dir = store.run_dir(run_id)

    state = TrainState(run_id=run_id, is_main_process=main)
    control = TrainControl()
    hooks = CallbackList((chat_callbacks(config, store, run_id) if main else []) + list(callbacks or []))
    status, metrics, error = "failed", None, None
    wall_start = time.perf_counter()
    previous_sigterm = _install_sigterm(control)
    try:
        # --- data and model -----------------------------------------------------------------------
        task = generation_task(config.task)
        set_seed(config.train.seed)
        data = task.load_data(config.data, config.train.seed)
        if config.chat.system_prompt:
            data.train = [with_system_prompt(c, config.chat.system_prompt) for c in data.train]
            data.eval = [with_system_prompt(c, config.chat.system_prompt) for c in data.eval]
        source = resolve_model(config.model, store.home, config.trust_remote_code)
        _check_batch_fits(config, data, accelerator.num_processes)
        set_seed(config.train.seed)  # adapters start the same whatever the data loading did
        built = task.build_model(config, source)
        model, tokenizer = built.model, built.tokenizer
        encoder = task.encoder(tokenizer, config.train.max_length)
        train_enc, train_cut = encode_all(encoder, data.train, "training")
        eval_enc, eval_cut = encode_all(encoder, data.eval, "held-out")
        if train_cut or eval_cut:
            data.notes.append(f"dropped {train_cut} training and {eval_cut} held-out conversations whose answer "
                              f"starts beyond train.max_length = {config.train.max_length} tokens")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        samples = sample_conversations(data.eval, config.chat.sample_prompts)
        if config.train.fast_dropout and accelerator.device.type == "cpu":
            undo_fast_dropout = use_fast_dropout(model)  # torch's bernoulli_ was a third of a CPU step
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        accum = config.train.gradient_accumulation
        micro_per_epoch = len(shard_batches(list(range(len(train_enc))), config.train.batch_size,
                                            accelerator.process_index, accelerator.num_processes))
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        max_steps = steps_per_epoch * config.train.epochs
        if main:
            store.set_info(run_id, _run_info(config, task, built, data, encoder, train_enc, eval_enc,
                                             accelerator.num_processes))

        # --- optimiser and schedule ---------------------------------------------------------------
        warmup = math.ceil(config.train.warmup_ratio * max_steps)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(config.train.scheduler if config.train.scheduler != "constant"
                                  else "constant_with_warmup", optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max_steps)
        model, optimizer = accelerator.prepare(model, optimizer)  # DDP wrap when distributed
        state.max_steps, state.steps_per_epoch, state.warmup_steps = max_steps, steps_per_epoch, warmup

        progress = Progress()
        ckpt = latest_checkpoint(run_dir) if resume else None
        if resume and ckpt is None and main:
            store.truncate_points(run_id, -1)  # nothing to resume from: start over cleanly
        if ckpt is not None:
            progress = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
            if main:
                store.truncate_points(run_id, progress.global_step)
        _sync_state(state, progress)
        eval_every = config.train.eval_every or steps_per_epoch
        hooks.on_train_begin(state, config.to_dict())
        evaluate = lambda epoch, fraction: _evaluate_and_checkpoint(  # noqa: E731
            config, task, accelerator, model, encoder, eval_enc, data.eval, samples, pad_id, optimizer, scheduler,
            progress, state, control, hooks, run_dir, epoch, fraction)

        # --- the base model's figures -------------------------------------------------------------
        if ckpt is None and config.chat.eval_at_start:
            evaluate(0, 0.0)
            if _stop_everywhere(control, accelerator):
                raise StopRequested(control.stop_reason)

        # --- training -----------------------------------------------------------------------------
        model.train()
        for epoch in range(progress.epoch, config.train.epochs):
            batches = shard_batches(epoch_order(len(train_enc), config.train.seed, epoch), config.train.batch_size,
                                    accelerator.process_index, accelerator.num_processes)
            groups = [batches[i: i + accum] for i in range(0, len(batches), accum)]
            first_group = progress.batch_in_epoch // accum if epoch == progress.epoch else 0
            for g, group in enumerate(groups[first_group:], start=first_group):
                step_start = time.perf_counter()
                group_size = sum(len(b) for b in group)
                micro_batches = [task.collate(train_enc, idx, pad_id) for idx in group]
                step_loss = accumulate_token_gradients(model, accelerator, micro_batches, task.count)
                if config.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
                learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step_loss = accelerator.reduce(step_loss, reduction="sum")  # per answer token, all processes
                loss_value = step_loss.item()  # sync point
                if not math.isfinite(loss_value):
                    raise WorkbenchError(
                        f"training loss became {loss_value} at step {progress.global_step + 1}: lower "
                        f"train.learning_rate (now {config.train.learning_rate}) or keep train.max_grad_norm > 0")
                elapsed = time.perf_counter() - step_start
                progress.global_step += 1
                progress.batch_in_epoch = (g + 1) * accum
                progress.samples_seen += group_size * accelerator.num_processes
                _sync_state(state, progress, epoch)
                hooks.on_step_end(state, control, loss_value, learning_rate,
                                  group_size * accelerator.num_processes / max(elapsed, 1e-9))
                progress.train_seconds += time.perf_counter() - step_start

                last_step = progress.global_step == max_steps
                if progress.global_step % eval_every == 0 or last_step or (g == len(groups) - 1 and
                                                                           not config.train.eval_every):
                    evaluate(epoch, (g + 1) / len(groups))
                if _stop_everywhere(control, accelerator):
                    raise StopRequested(control.stop_reason)
            progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        status = "completed"
    except StopRequested as stop:
        status = "stopped" if "early stopping" not in str(stop) else "completed"
        if status == "stopped" and main:
            _save_stop_checkpoint(locals(), run_dir, hooks, state)
    except WorkbenchError as exc:
        error = str(exc)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; resume starts from the last checkpoint
        status = "stopped"
    except Exception as exc:  # a crash: the run is marked failed with the reason
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{INTERNAL_ERROR}{type(exc).__name__}: {detail} (traceback in {run_dir / 'log.txt'})"
        _log_traceback(run_dir)
    finally:
        _restore_sigterm(previous_sigterm)
        torch.set_num_threads(previous_threads)
        if "undo_fast_dropout" in locals():
            undo_fast_dropout()
        try:
            if status in ("completed", "stopped") and "model" in locals() and "progress" in locals():
                metrics = _finalise(accelerator.unwrap_model(model), accelerator, store, run_id, run_dir, config.task)
        except Exception as exc:  # finalising must not hide the run's outcome
            status, error = "failed", f"could not save the final model: {type(exc).__name__}: {exc}"
            _log_traceback(run_dir)
        if error is not None:
            status = "failed"
            hooks.on_exception(state, error)
        timings = _timings(locals(), wall_start, accelerator)
        if main:
            store.finish(run_id, status, metrics=metrics, timings=timings, error=error)
        hooks.on_train_end(state, status, metrics or {})
    return store.get(run_id) if main else {"id": run_id, "status": status}


train_chat = train_generation  # the name task chat has always used


def _run_info(config: Config, task: GenerationTask, built: ChatModel, data: ChatData, encoder: Any,
              train_enc: list[dict], eval_enc: list[dict], world: int) -> dict[str, Any]:
    return {
        "task": task.name,
        "train_rows": len(train_enc),
        "eval_rows": len(eval_enc),
        "train_answer_tokens": sum(task.count(torch.tensor([e["labels"]])) for e in train_enc),
        "eval_answer_tokens": sum(task.count(torch.tensor([e["labels"]])) for e in eval_enc),
        "data_format": data.format,
        "data_columns": data.columns,
        "prompt_format": encoder.prompt_format,
        "data_notes": data.notes + ([f"dropped {data.blank_dropped} rows with a blank question or answer"]
                                    if data.blank_dropped else [])
        + ([f"dropped {data.duplicates_dropped} duplicate conversations"] if data.duplicates_dropped else []),
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "trainable_percent": round(100 * built.trainable_params / max(built.total_params, 1), 4),
        "head_modules": [],
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}),
        "num_processes": world,
        "torch_threads": torch.get_num_threads(),
    }


def _evaluate_and_checkpoint(config: Config, task: GenerationTask, accelerator: Any, model: Any, encoder: Any,
                             eval_enc: list[dict], held: list[Conversation], samples: list[Conversation],
                             pad_id: int, optimizer: Any, scheduler: Any, progress: Any, state: TrainState,
                             control: TrainControl, hooks: Callback, run_dir: Path, epoch: int,
                             fraction: float) -> None:
    from .trainer import _sync_state, save_checkpoint

    eval_start = time.perf_counter()
    unwrapped = accelerator.unwrap_model(model)  # no DDP hooks: processes evaluate different rows
    loss, tokens = held_out_loss(unwrapped, accelerator, eval_enc, config.train.effective_eval_batch_size, pad_id,
                                 task.collate, task.count)
    if not math.isfinite(loss):
        raise WorkbenchError(f"held-out loss is {loss} at step {progress.global_step}: lower train.learning_rate")
    # generation on the main process only: its outputs go to the store, which only it writes
    answers, scores = (task.outputs(unwrapped, encoder, held, samples, config)
                       if accelerator.is_main_process else ([], {}))
    result = ChatEvalResult(step=progress.global_step, epoch=epoch + fraction, eval_loss=loss,
                            accuracy=float("nan"), f1_macro=float("nan"), labels=[], confusion_matrix=[],
                            perplexity=perplexity(loss), eval_tokens=tokens, samples=answers, scores=scores)
    improved = progress.best_metric is None or loss < progress.best_metric  # lower held-out loss is better
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = loss, progress.global_step, 0
    else:
        progress.evals_without_improvement += 1
    _sync_state(state, progress, epoch)
    patience = config.train.early_stopping_patience
    if patience and progress.evals_without_improvement >= patience:
        control.request_stop(f"early stopping: no lower held-out loss in {patience} evaluations")
    hooks.on_evaluate(state, control, result)
    if accelerator.is_main_process:
        _write_samples(run_dir, result)
        ckpt_root = run_dir / "checkpoints"
        path = ckpt_root / f"step-{progress.global_step}"
        save_checkpoint(path, unwrapped, optimizer, scheduler, progress)
        if improved:
            best, tmp = ckpt_root / "best", ckpt_root / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(best, ignore_errors=True)
            tmp.replace(best)
        for old in ckpt_root.glob("step-*"):  # keep the newest resumable checkpoint only
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        hooks.on_checkpoint(state, str(path), improved)
    accelerator.wait_for_everyone()
    progress.eval_seconds += time.perf_counter() - eval_start


def _write_samples(run_dir: Path, result: ChatEvalResult) -> None:
    """The evaluation's figures and sample answers, as <run>/eval/step-N.json."""
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    tmp = out / f"step-{result.step}.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in result.summary().items() if k not in ("labels", "confusion_matrix")},
                              indent=1))
    tmp.replace(out / f"step-{result.step}.json")


def _finalise(model: torch.nn.Module, accelerator: Any, store: RunStore, run_id: str,
              run_dir: Path, task: str = "chat") -> dict[str, Any] | None:
    """Restore the best checkpoint's weights, save them as the run's model, return its metrics."""
    from safetensors.torch import load_file, save_file

    from .trainer import load_trainable_state, trainable_state

    best = run_dir / "checkpoints" / "best"
    if not (best / "trainable.safetensors").is_file():
        return None
    load_trainable_state(model, load_file(str(best / "trainable.safetensors")))
    if not accelerator.is_main_process:
        return None
    out, tmp = run_dir / "model", run_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    (tmp / "task.json").write_text(json.dumps({"task": task}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    best_step = json.loads((best / "progress.json").read_text())["global_step"]
    evals = store.points(run_id, kind="eval")
    at_best = [p for p in evals if p["step"] == best_step]
    if not at_best:
        return None
    keep = ("step", "epoch", "eval_loss", "perplexity", "bleu", "chrf", "eval_tokens", "samples")
    summary = {k: at_best[-1][k] for k in keep if k in at_best[-1]}
    summary["best_step"] = best_step
    summary["samples_file"] = str(run_dir / "eval" / f"step-{best_step}.json")
    first = evals[0] if evals else None
    if first is not None and first["step"] == 0:
        summary["start_eval_loss"], summary["start_perplexity"] = first["eval_loss"], first["perplexity"]
    return summary


# --- answering with a trained run -------------------------------------------------------------------

class _StopOnEvent:
    """A generation stopping criterion that ends generation once `event` is set (a Stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatPredictor:
    """A tuned chat model: `predict(questions)` answers each (greedy); `stream(question)` yields text pieces."""

    task = "chat"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, max_new_tokens: int,
                 run_id: str = "", system_prompt: str | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.encoder = ChatEncoder(tokenizer, max_length)
        self.max_new_tokens, self.run_id = max_new_tokens, run_id
        self.system_prompt = system_prompt  # the run's chat.system_prompt: asked as it was trained
        self._lock = threading.Lock()  # one generation at a time on this model

    def answer(self, question: str | Conversation, max_new_tokens: int | None = None) -> str:
        """The greedy answer to a question (or to a conversation ending with a user turn)."""
        with self._lock:
            return generate_answer(self.model, self.encoder, _as_messages(question, self.system_prompt),
                                   max_new_tokens or self.max_new_tokens)

    def predict(self, texts: str | list[str], batch_size: int = 1) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        return [{"text": t, "answer": self.answer(t)} for t in texts]

    def stream(self, question: str | Conversation, max_new_tokens: int | None = None,
               stop: threading.Event | None = None) -> Iterator[str]:
        """Pieces of the greedy answer as they are generated (generation runs on its own thread)."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        messages = _as_messages(question, self.system_prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        stop = stop or threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock:
                    generate_answer(self.model, self.encoder, messages, max_new_tokens or self.max_new_tokens,
                                    streamer=streamer, stopping=StoppingCriteriaList([_StopOnEvent(stop)]))
            except BaseException as exc:  # surfaced in the caller's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="chat-generate", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]


def with_system_prompt(conv: Conversation, system_prompt: str | None) -> Conversation:
    """The conversation with `system_prompt` as its first turn, unless it has a system turn of its own."""
    if not system_prompt or any(t["role"] == "system" for t in conv):
        return conv
    return [{"role": "system", "content": system_prompt}, *conv]


def _as_messages(question: str | Conversation, system_prompt: str | None = None) -> Conversation:
    if isinstance(question, str):
        if not question.strip():
            raise WorkbenchError("type a question to answer")
        return with_system_prompt([{"role": "user", "content": question}], system_prompt)
    conv = check_messages(list(question) + [{"role": "assistant", "content": "-"}], "the conversation")[:-1]
    return with_system_prompt(conv, system_prompt)


def rebuild_generation_run(record: dict[str, Any], home: Path,
                           build: Callable[[Config, ModelSource], ChatModel]) -> tuple[Config, ChatModel]:
    """A generation run's config and model: `build` (base weights, same seed) + the run's trained parameters."""
    from safetensors.torch import load_file

    from .trainer import load_trainable_state, set_seed

    model_dir = Path(record["dir"]) / "model"
    if not (model_dir / "trainable.safetensors").is_file():
        raise WorkbenchError(f"run {record['id']} has no trained model yet (status {record['status']}): "
                             "wait until it completes an evaluation, or pick another run")
    config = Config.from_dict(record["config"])
    set_seed(config.train.seed)
    built = build(config, resolve_model(config.model, home, config.trust_remote_code))
    load_trainable_state(built.model, load_file(str(model_dir / "trainable.safetensors")))
    return config, built


def load_chat_predictor(record: dict[str, Any], home: Path) -> ChatPredictor:
    """Rebuild a chat run's model (base weights + the run's trained parameters)."""
    config, built = rebuild_generation_run(record, home, build_chat_model)
    return ChatPredictor(built.model, built.tokenizer, config.train.max_length, config.chat.max_new_tokens,
                         record["id"], config.chat.system_prompt)

