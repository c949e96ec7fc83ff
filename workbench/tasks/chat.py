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

`ChatTask` is a `generation.GenerationTask`: the loop (workbench/loop/) trains it like every other task.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from ..catalog import DATASETS, ModelSource
from ..config import Config, DataConfig
from ..data import load_chatterbot_pairs, load_table
from ..errors import WorkbenchError
from ..models.generation import GenerationModel, check_generation_method, generation_kwargs, load_generation_model
from ..models.loading import architecture, is_causal_lm, load_config, load_tokenizer, quiet_libraries
from ..task_table import spec_for
from .generation import (IGNORE_INDEX, SAMPLE_CHARS, ChatData, Conversation, GenerationTask, prompt_and_reference,
                         rebuild_generation_run, split_and_cap, text_of)

SPEC = spec_for("chat:ChatTask")

ROLES = ("system", "user", "assistant")
PROMPT_NAMES = ("prompt", "question", "instruction", "input", "query", "user", "text")
ANSWER_NAMES = ("completion", "answer", "response", "output", "reply", "assistant", "target")
MESSAGES_NAMES = ("messages", "conversation", "conversations", "chat", "dialog", "dialogue")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")  # newlines as expressions: trim_blocks


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
        prompts, answers = df[columns["prompt"]].map(text_of).tolist(), df[columns["answer"]].map(text_of).tolist()
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
    if source == "chatterbot":
        import pandas as pd

        return pd.DataFrame(load_chatterbot_pairs())
    if source in DATASETS:
        raise WorkbenchError(f"dataset {source!r} holds labelled texts, not questions and answers: task chat "
                             "needs chatterbot, or a file with prompt/answer columns or a messages column")
    df, _ = load_table(source)
    return df


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


@torch.no_grad()
def generate_answer(model: torch.nn.Module, encoder: ChatEncoder, messages: Conversation, max_new_tokens: int,
                    streamer: Any = None, stopping: Any = None, temperature: float = 0.0, top_p: float = 1.0) -> str:
    """The model's answer to a conversation that ends with a user turn: greedy at temperature 0, else sampled
    (`generation_kwargs`)."""
    ids = encoder.prompt_ids(messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=streamer, stopping_criteria=stopping,
                             **generation_kwargs(encoder.tokenizer, max_new_tokens, temperature, top_p))
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


def check_chat_model(config: Config, source: ModelSource) -> None:
    """The model checks that need no weights: a causal LM, the context length, adapter targets, bitsandbytes."""
    from transformers import AutoModelForCausalLM

    model_config = load_config(source, config.trust_remote_code)
    if not is_causal_lm(model_config):
        raise WorkbenchError(f"task chat needs a causal language model such as smollm2-135m-instruct: model "
                             f"{config.model!r} is {architecture(model_config)}, which cannot generate text")
    check_generation_method(config, model_config, AutoModelForCausalLM)


def build_chat_model(config: Config, source: ModelSource) -> GenerationModel:
    """Load the causal LM and apply full, lora or qlora (adapters on every linear layer but the output)."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    check_chat_model(config, source)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    return load_generation_model(config, source, tokenizer, AutoModelForCausalLM, "CAUSAL_LM")


class ChatTask(GenerationTask):
    name = SPEC.name
    examples = "training conversations"

    def read(self, cfg: DataConfig, seed: int) -> ChatData:
        return load_chat_data(cfg, seed)

    def load_data(self, config: Config, home: Path) -> ChatData:
        data = load_chat_data(config.data, config.train.seed)
        if config.chat.system_prompt:  # trained and evaluated as it will be asked
            data.train = [with_system_prompt(c, config.chat.system_prompt) for c in data.train]
            data.eval = [with_system_prompt(c, config.chat.system_prompt) for c in data.eval]
        return data

    def check(self, config: Config, source: ModelSource, data: ChatData | None) -> None:
        check_chat_model(config, source)

    def build_model(self, config: Config, source: ModelSource, data: ChatData | None) -> GenerationModel:
        return build_chat_model(config, source)

    def encoder(self, tokenizer: Any, max_length: int) -> ChatEncoder:
        return ChatEncoder(tokenizer, max_length)

    def collate_examples(self, encodings: list[dict], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_chat(encodings, indices, pad_id)

    def outputs(self, model: torch.nn.Module, encoder: ChatEncoder, held: list[Conversation],
                samples: list[Conversation], config: Config) -> tuple[list[dict[str, str]], dict[str, float]]:
        return sample_answers(model, encoder, samples, config.chat.max_new_tokens), {}

    def load_predictor(self, record: dict[str, Any], home: Path) -> "ChatPredictor":
        """Rebuild a chat run's model (base weights + the run's trained parameters)."""
        config, built = rebuild_generation_run(record, home, build_chat_model)
        return ChatPredictor(built.model, built.tokenizer, config.train.max_length, config.chat.max_new_tokens,
                             record["id"], config.chat.system_prompt)


# --- answering with a trained run -------------------------------------------------------------------

class _StopOnEvent:
    """A generation stopping criterion that ends generation once `event` is set (a Stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatPredictor:
    """A tuned chat model: `predict(questions)` answers each (greedy); `stream(question)` yields text pieces."""

    task = SPEC.name

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, max_new_tokens: int,
                 run_id: str = "", system_prompt: str | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.encoder = ChatEncoder(tokenizer, max_length)
        self.max_new_tokens, self.run_id = max_new_tokens, run_id
        self.system_prompt = system_prompt  # the run's chat.system_prompt: asked as it was trained
        self._lock = threading.Lock()  # one generation at a time on this model

    def answer(self, question: str | Conversation, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0) -> str:
        """The answer to a question (or to a conversation ending with a user turn): greedy at temperature 0."""
        with self._lock:
            return generate_answer(self.model, self.encoder, _as_messages(question, self.system_prompt),
                                   max_new_tokens or self.max_new_tokens, temperature=temperature, top_p=top_p)

    def predict(self, texts: str | list[str], batch_size: int = 1) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        return [{"text": t, "answer": self.answer(t)} for t in texts]

    def stream(self, question: str | Conversation, max_new_tokens: int | None = None,
               stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str]:
        """Pieces of the answer as they are generated (generation runs on its own thread); greedy at
        temperature 0."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        messages = _as_messages(question, self.system_prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        stop = stop or threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock:
                    generate_answer(self.model, self.encoder, messages, max_new_tokens or self.max_new_tokens,
                                    streamer=streamer, stopping=StoppingCriteriaList([_StopOnEvent(stop)]),
                                    temperature=temperature, top_p=top_p)
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
