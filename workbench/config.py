"""Run configuration: typed dataclasses, validated on construction, YAML in and out.

A config is plain data. Every field is checked when the object is built, so an
impossible setting fails before any model is loaded, with a message that names
the field, the bad value and what is allowed. Checks that need the model (the
model's context length, its layer names) run when the model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import WorkbenchError
from .methods import DEFAULT_METHOD, METHOD_NAMES, ZERO_SHOT_METHODS, method_spec, methods_where  # noqa: F401
from .methods import METHODS as METHOD_SPECS
from .methods import TRAINING_METHODS as _TRAINING_METHODS
from .task_table import DEFAULT_TASK, TASK_NAMES, task_spec, tasks_where

# The choices come from the method registry and the task table; nothing here spells a name.
Task = Literal[TASK_NAMES]  # type: ignore[valid-type]
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
METHODS: tuple[str, ...] = METHOD_NAMES
VIRTUAL_TOKEN_METHODS = methods_where(family="virtual-tokens")
TRAINING_METHODS = _TRAINING_METHODS
CHAT_COLUMNS = ("prompt_column", "answer_column", "messages_column")
LANGUAGE_FIELDS = ("source_lang", "target_lang")  # task seq2seq: the language codes of M2M-100, NLLB, mBART
GENERATION_TASKS = tasks_where(kind="generation")  # generated text: the chat section applies to these tasks
# train.learning_rate left out: the method's rate (peak AdamW rate; adapters and heads take larger steps than
# full fine-tuning, whose 5e-5 keeps the pretrained weights close to where they were)
METHOD_LEARNING_RATES: dict[str, float] = {m.name: m.learning_rate for m in METHOD_SPECS.values()
                                           if m.learning_rate is not None}
ENCODER_TASKS = tasks_where(kind="encoder")  # a text in, a head's output out


MAX_SHOWN_CHARS = 200  # a value echoed in an error message is cut to this: a config can hold anything
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; a bigger file is not one


def shown(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise WorkbenchError(f"{section}.{name} = {shown(value)} is not allowed: {allowed}")


@dataclass
class DataConfig:
    """Where the labelled text comes from and how it is split."""

    source: str = field(default="bbc-news", metadata={"help": "catalog name, or a CSV/TSV/JSONL/Parquet path"})
    text_column: str | None = field(default=None, metadata={"help": "text column; detected when left out"})
    label_column: str | None = field(default=None, metadata={"help": "label column; detected when left out"})
    eval_source: str | None = field(default=None, metadata={"help": "a separate eval file; else split from source"})
    max_train_samples: int | None = field(default=None, metadata={"help": "cap on training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on evaluation rows"})
    eval_fraction: float = field(default=0.2, metadata={"help": "share held out for evaluation"})
    mask_personal: Literal["stored", "all", "off"] = field(default="stored", metadata={
        "help": "personal data (e-mail addresses, phone numbers, card numbers, IP addresses) replaced by "
                "[EMAIL], [PHONE], ... in everything the run stores or shows about its data (logs, mistakes, "
                "predictions, drift snapshots); all: also in the training and eval texts before the model "
                "sees them; off: nothing masked"})
    augment: list[Literal["synonym", "insert", "swap", "delete", "back-translation"]] = field(
        default_factory=list, metadata={
            "help": "classification and regression: add training rows made from the training rows (never the "
                    "eval rows): synonym (a word in ten replaced by its nearest neighbour in the model's "
                    "word embeddings), insert (such a neighbour put in), swap (two words exchanged), delete "
                    "(words dropped with probability 0.1), back-translation (through data.back_translation and "
                    "back); each new row takes one of them at random"})
    augment_factor: float = field(default=1.0, metadata={
        "help": "new rows per training row with data.augment (1.5: one each, and a second for half of them)"})
    back_translation: list[str] | None = field(default=None, metadata={
        "help": "data.augment back-translation: [to, back], two translation models (a model directory, a hub "
                "id, or run:<id> of a seq2seq run), e.g. [Helsinki-NLP/opus-mt-en-de, Helsinki-NLP/opus-mt-de-en]"})
    unlabeled_source: str | None = field(default=None, metadata={
        "help": "self-training: a file of unlabelled texts (CSV/TSV/JSONL/Parquet text column, or .txt one a "
                "line) that data.pseudo_label_from labels"})
    pseudo_label_from: str | None = field(default=None, metadata={
        "help": "self-training: the completed classification run (id) whose confident answers on "
                "data.unlabeled_source join the training rows (counted apart from the gold ones)"})
    pseudo_label_threshold: float = field(default=0.9, metadata={
        "help": "self-training: the least top-class probability a pseudo-label needs"})
    prompt_column: str | None = field(default=None, metadata={
        "help": "task chat: the question (user turn) column; task seq2seq: the source text column; "
                "detected when left out"})
    answer_column: str | None = field(default=None, metadata={
        "help": "task chat: the answer (assistant turn) column, the only text the loss is on; "
                "task seq2seq: the target text column; detected"})
    messages_column: str | None = field(default=None, metadata={
        "help": "task chat: a column of OpenAI-style message lists [{role, content}, ...] instead of "
                "prompt/answer columns; detected ('messages')"})
    source_lang: str | None = field(default=None, metadata={
        "help": "task seq2seq: the source language code of a model that marks languages (M2M-100: en, NLLB: "
                "eng_Latn, mBART-50: en_XX); taken from the column names when they are codes (en, de)"})
    target_lang: str | None = field(default=None, metadata={
        "help": "task seq2seq: the target language code (M2M-100: de, NLLB: deu_Latn, mBART-50: de_DE); the "
                "first generated token is forced to it"})

    def __post_init__(self) -> None:
        self._check_source()
        self._check_caps()
        self._check_eval_fraction()
        self._check_chat_columns()
        self._check_languages()
        self._check_more_rows()

    def _check_more_rows(self) -> None:
        if not 0 < self.augment_factor <= 10:
            _fail("data", "augment_factor", self.augment_factor, "new rows per training row, above 0 and at most 10")
        if "back-translation" in self.augment and (not isinstance(self.back_translation, list)
                                                   or len(self.back_translation) != 2):
            _fail("data", "back_translation", self.back_translation, "[to, back]: two translation models, "
                  "e.g. [Helsinki-NLP/opus-mt-en-de, Helsinki-NLP/opus-mt-de-en]")
        if self.back_translation is not None and "back-translation" not in self.augment:
            _fail("data", "back_translation", self.back_translation, "left out unless data.augment has "
                  "back-translation")
        if (self.unlabeled_source is None) != (self.pseudo_label_from is None):
            name = "unlabeled_source" if self.unlabeled_source is not None else "pseudo_label_from"
            _fail("data", name, getattr(self, name), "set together with data." +
                  ("pseudo_label_from (the run that labels it)" if name == "unlabeled_source" else
                   "unlabeled_source (the texts it labels)"))
        if not 0.0 < self.pseudo_label_threshold <= 1.0:
            _fail("data", "pseudo_label_threshold", self.pseudo_label_threshold, "a probability, e.g. 0.9")

    def _check_source(self) -> None:
        for name in ("source", "eval_source"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or "\x00" in value):
                _fail("data", name, value, "a catalog dataset name or a file path"
                      + (", or leave it out" if name == "eval_source" else ""))

    def _check_caps(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail("data", name, value, "a positive number of rows, or leave it out for all rows")

    def _check_eval_fraction(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            _fail("data", "eval_fraction", self.eval_fraction, "a fraction strictly between 0 and 1, e.g. 0.2")

    def _check_chat_columns(self) -> None:
        for name in CHAT_COLUMNS:
            value = getattr(self, name)
            if value is not None and not value.strip():
                _fail("data", name, value, "a column name, or leave it out to detect it")
        if self.messages_column and (self.prompt_column or self.answer_column):
            _fail("data", "messages_column", self.messages_column,
                  "either a messages column or prompt/answer columns, not both: leave one out")

    def _check_languages(self) -> None:
        for name in LANGUAGE_FIELDS:
            value = getattr(self, name)
            if value is not None and (not value.strip() or value != value.strip()):
                _fail("data", name, value, "a language code such as en, eng_Latn or en_XX, or leave it out")
        if (self.source_lang is None) != (self.target_lang is None):
            missing, given = ("target_lang", "source_lang") if self.target_lang is None else LANGUAGE_FIELDS
            _fail("data", missing, None, f"a language code too, since data.{given} is set: set both, or neither")


@dataclass
class MethodConfig:
    """The tuning method and its knobs; each field's help says which methods read it."""

    name: MethodName = field(default=DEFAULT_METHOD, metadata={
        "help": " | ".join(METHOD_NAMES) + " (zero-shot methods train nothing: baselines)"})
    r: int = field(default=8, metadata={"help": "LoRA rank (lora, qlora); adalora: the target average rank"})
    alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r); lora, qlora, adalora"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter path; lora, qlora, adalora"})
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = field(
        default="auto", metadata={"help": "'auto', 'all-linear', or a list of layer names (lora, qlora, adalora, "
                                          "ia3; ia3 'auto' = keys, values and feed-forward down projections)"}
    )
    train_head: bool = field(
        default=True, metadata={"help": "also train the task head and any freshly initialised layer (pooler)"}
    )
    use_rslora: bool = field(default=False, metadata={
        "help": "lora, qlora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (rsLoRA)"})
    use_dora: bool = field(default=False, metadata={
        "help": "lora, qlora: weight-decomposed LoRA (DoRA): a trained magnitude per output feature"})
    init_r: int = field(default=12, metadata={
        "help": "adalora: starting rank of every target layer, pruned during training to an average of r"})
    rank_warmup_ratio: float = field(default=0.1, metadata={
        "help": "adalora: share of the steps trained at init_r before ranks are pruned"})
    rank_final_ratio: float = field(default=0.2, metadata={
        "help": "adalora: share of the last steps trained with the final, fixed ranks"})
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "prompt-tuning, prefix-tuning: trained virtual tokens put before every input"})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "QLoRA 4-bit data type"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantise the quantisation constants"})
    compute_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "QLoRA: dtype of the de-quantised matmul"}
    )
    label_template: str = field(default="This text is about {label}.", metadata={
        "help": "zero-shot-embedding: the text embedded for each label; {label} is replaced by the label name "
                "('{label}' alone embeds the bare name)"})
    prompt_scoring: Literal["sum", "mean", "first"] = field(default="sum", metadata={
        "help": "zero-shot-prompt: a label's score is the sum (the label's log-probability), mean "
                "(length-normalised) or first-token log-probability of its tokens after the prompt"})
    few_shot_k: int = field(default=0, metadata={
        "help": "zero-shot-prompt: labelled training examples shown in the prompt (0 = zero-shot), "
                "drawn with train.seed, labels taken in turn"})
    prompt_calibration: bool = field(default=False, metadata={
        "help": "zero-shot-prompt: contextual calibration (Zhao et al. 2021): the label scores of content-free "
                "inputs ('N/A', '', '[MASK]') in the same prompt estimate the prompt's own bias, which is "
                "divided out of every prediction"})

    def __post_init__(self) -> None:
        self._check_rank()
        self._check_dropout()
        self._check_targets()
        self._check_lora_variants()
        self._check_adalora()
        self._check_virtual_tokens()
        self._check_zero_shot()

    def _check_rank(self) -> None:
        if self.r <= 0:
            _fail("method", "r", self.r, "a LoRA rank >= 1 (typical: 4, 8, 16)")
        if self.alpha <= 0:
            _fail("method", "alpha", self.alpha, "a positive number (typical: 2 x r)")

    def _check_dropout(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            _fail("method", "dropout", self.dropout, "a probability in [0, 1)")

    def _check_targets(self) -> None:
        if isinstance(self.target_modules, list) and not self.target_modules:
            _fail("method", "target_modules", self.target_modules, "'auto', 'all-linear', or a non-empty list")
        if isinstance(self.target_modules, list) and self.name in VIRTUAL_TOKEN_METHODS:
            _fail("method", "target_modules", self.target_modules,
                  f"'auto' for {self.name}, which adds virtual tokens and adapts no layer")

    def _check_lora_variants(self) -> None:
        for name in ("use_rslora", "use_dora"):
            if getattr(self, name) and not method_spec(self.name).lora_variants:
                _fail("method", name, True, f"false for {self.name}; rsLoRA and DoRA are variants of "
                                            f"{' and '.join(methods_where(lora_variants=True))}")

    def _check_adalora(self) -> None:
        if self.init_r < 1:
            _fail("method", "init_r", self.init_r, "a starting rank >= 1 (typical: 12)")
        if method_spec(self.name).prunes_ranks and self.init_r < self.r:
            _fail("method", "init_r", self.init_r, f"at least method.r = {self.r}: {self.name} prunes ranks "
                                                   "from init_r down to an average of r")
        for name in ("rank_warmup_ratio", "rank_final_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail("method", name, getattr(self, name), "a fraction of the steps in [0, 1), e.g. 0.1")
        if self.rank_warmup_ratio + self.rank_final_ratio >= 1.0:
            _fail("method", "rank_final_ratio", self.rank_final_ratio,
                  f"less than 1 - method.rank_warmup_ratio ({1.0 - self.rank_warmup_ratio:g}): "
                  "adalora needs steps left to prune ranks")

    def _check_virtual_tokens(self) -> None:
        if self.num_virtual_tokens < 1:
            _fail("method", "num_virtual_tokens", self.num_virtual_tokens, "at least 1 token (typical: 10 to 30)")

    def _check_zero_shot(self) -> None:
        template = self.label_template
        try:
            ok = "\0" in template.format(label="\0")  # the label name really goes in
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            _fail("method", "label_template", template,
                  "text with {label} where the label name goes and no other {...} field, "
                  "e.g. 'This text is about {label}.'")
        if self.few_shot_k < 0:
            _fail("method", "few_shot_k", self.few_shot_k, "0 (zero-shot) or a number of examples such as 5")
        for name, what in (("few_shot_k", "examples in the prompt are"), ("prompt_calibration", "calibration is")):
            value = getattr(self, name)
            if value and name not in method_spec(self.name).fields:
                owner = " or ".join(m.name for m in METHOD_SPECS.values() if name in m.fields)
                _fail("method", name, value, f"{0 if name == 'few_shot_k' else 'false'} for {self.name}; "
                                             f"{what} an option of {owner}")

    @property
    def spec(self):  # noqa: ANN201 - workbench.methods.MethodSpec
        """The method's registry entry: what it is, what it reads, how it builds and saves."""
        return method_spec(self.name)

    @property
    def is_zero_shot(self) -> bool:
        """No training: the pretrained model is evaluated as it is (workbench.zeroshot)."""
        return self.spec.is_zero_shot

    @property
    def uses_adapters(self) -> bool:
        """Adapters on chosen linear layers (the target_modules apply)."""
        return self.spec.uses_adapters

    @property
    def uses_peft(self) -> bool:
        """Built with peft: the model is a PeftModel with the head in modules_to_save."""
        return self.spec.uses_peft


@dataclass
class TrainConfig:
    """Optimisation schedule, evaluation cadence and reproducibility."""

    epochs: int | None = field(default=None, metadata={
        "help": "passes over the training set; left out: chosen from the data size (classification and "
                "regression: enough for about 300 optimiser steps, 2 to 40 epochs, with early stopping (its patience counted from the end of the warmup); chat and "
                "seq2seq: 2)"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimiser step, per process, before accumulation"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "defaults to 2 x batch_size"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "peak learning rate (AdamW); left out: the method's rate (lora 1e-3, full 5e-5, head-only 2e-3, "
                "ia3 3e-3, prompt-tuning 3e-2)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps spent warming up"})
    scheduler: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "decay after warmup"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per example; left out: classification and regression take the 90th percentile of the "
                "training texts' token lengths (64 to 256 on a CPU, to 512 on a GPU, within the model's limit); "
                "chat and seq2seq 256"})
    truncation: Literal["head+tail", "head", "chunks"] = field(default="head+tail", metadata={
        "help": "classification and regression: a text longer than max_length is read as its first quarter "
                "and last three quarters of tokens (head+tail: the ending often holds the verdict), its "
                "first tokens (head), or whole as overlapping chunks of max_length tokens whose predictions "
                "are averaged (chunks: nothing is cut, each chunk costs a forward pass); the same in "
                "training, evaluation, predict and serve"})
    gradient_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 = off"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N optimiser steps; 0 = each epoch"})
    early_stopping_patience: int = field(default=2, metadata={"help": "evaluations without improvement; 0 = off"})
    seed: int = field(default=42, metadata={"help": "seeds data order, dropout and new layers"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="fp32", metadata={
        "help": "fp32; bf16 (frozen base weights and their matmuls in bf16, adapters, head and optimiser in fp32); "
                "auto: bf16 where the device computes it natively, else fp32"})
    length_bucketing: bool = field(default=False, metadata={
        "help": "batch rows of similar length together (sorted within random windows of 50 batches), so a batch "
                "pads less: short texts train faster; the batches differ from the plain shuffle's"})
    device: Literal["auto", "cpu"] = field(default="auto", metadata={
        "help": "auto: a GPU when there is one (one per process under torchrun), else the CPU; cpu: always the "
                "CPU (processes talk over gloo)"})
    class_weights: Literal["auto", "none", "balanced"] = field(default="auto", metadata={
        "help": "classification: balanced weighs each class's loss by n_rows / (n_classes x its rows), so a "
                "minority class counts as much as the majority; auto: balanced when the training classes are "
                "skewed (the largest at least 1.5 x the smallest), else none"})
    best_metric: Literal["auto", "accuracy", "f1_macro"] = field(default="auto", metadata={
        "help": "classification: the eval figure that picks the best checkpoint and drives early stopping; "
                "auto: f1_macro when the training classes are skewed, else accuracy"})
    baseline: bool = field(default=True, metadata={
        "help": "classification and regression: fit the classical baseline (TF-IDF + logistic or ridge "
                "regression) on the training split and score it on the eval split, beside the model"})
    ensemble: Literal["auto", "off"] = field(default="auto", metadata={
        "help": "classification: auto: the run answers with the mean of the fine-tuned model's and the "
                "baseline's class probabilities when that scores higher on the eval split (said in the "
                "record); off: the fine-tuned model alone"})
    head_init: Literal["probe", "random"] = field(default="random", metadata={
        "help": "text-classification: probe: before the first step the head's last layer starts from a logistic "
                "regression fitted on the encoder's features of the training texts (up to 2,000; fresh square "
                "layers before it, such as a pooler the checkpoint lacks, start as the identity), so fine-tuning "
                "starts from a head that separates the classes (steadier on 100 random labels, but it made active "
                "learning's picks worse, so it is opt-in); random (the default): transformers' random head; other "
                "tasks read nothing here"})
    adversarial: Literal["off", "fgm", "pgd"] = field(default="off", metadata={
        "help": "adversarial training on the input embeddings: fgm adds the loss-increasing perturbation of "
                "norm adversarial_epsilon to each example's embeddings and trains on both passes (about 2x a "
                "step's cost); pgd takes adversarial_steps projected steps to find it (about 2 + steps - 1 "
                "x); classification, regression and token classification; one process"})
    adversarial_epsilon: float = field(default=1.0, metadata={
        "help": "the perturbation's norm per example (over its tokens and embedding dimensions)"})
    adversarial_steps: int = field(default=3, metadata={"help": "pgd: ascent steps per optimiser micro-batch"})
    init_from: str | None = field(default=None, metadata={
        "help": "continual learning: start from a completed run's trained weights (its id, or latest) on this "
                "config's data; same task, model, method and classes; the previous run's eval split is scored "
                "before and after (metrics.forgetting)"})
    replay: float = field(default=0.2, metadata={
        "help": "with init_from: mix in this share (of the new training rows) of the previous run's training "
                "rows, drawn with the seed, so the model keeps what it knew; 0 = none"})
    calibrate: bool = field(default=True, metadata={
        "help": "classification: fit a temperature on the eval split's class probabilities (expected "
                "calibration error before and after in the record); predict, evaluate and serve use it"})
    abstain_below: float | None = field(default=None, metadata={
        "help": "classification: answer 'uncertain' when the top class's calibrated probability is below "
                "this (0 to 1); predict, evaluate and serve; left out: always answer"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; default: all cores"})
    fast_dropout: bool = field(default=True, metadata={
        "help": "on CPU, draw dropout masks from uniform numbers: same distribution, ~25 % faster steps"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each layer's inputs in the forward pass and recompute the rest in the backward: "
                "activation memory down by most of its size, steps roughly a third slower (the same losses)"})

    def __post_init__(self) -> None:
        self._check_positive()
        self._check_ratios()

    def _check_positive(self) -> None:
        hints = {
            "epochs": "at least 1 pass over the data",
            "batch_size": "at least 1 example",
            "max_length": "at least 8 tokens (the model's limit is checked when it loads)",
            "gradient_accumulation": "at least 1 micro-batch",
        }
        for name, hint in hints.items():
            value = getattr(self, name)
            if value is not None and (value < 1 or (name == "max_length" and value < 8)):
                _fail("train", name, value, hint)
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            _fail("train", "eval_batch_size", self.eval_batch_size, "at least 1, or leave it out")
        if self.learning_rate is not None and self.learning_rate <= 0:
            _fail("train", "learning_rate", self.learning_rate, "a positive number such as 5.0e-4 (LoRA) or 2.0e-5 (full)")
        if not 0 <= self.seed < 2**32:
            _fail("train", "seed", self.seed, f"a whole number from 0 to {2**32 - 1}")
        if self.threads is not None and self.threads < 1:
            _fail("train", "threads", self.threads, "at least 1, or leave it out")
        for name in ("eval_every", "early_stopping_patience", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                _fail("train", name, getattr(self, name), "0 (off) or a positive number")

    def _check_ratios(self) -> None:
        if not 0.0 <= self.warmup_ratio < 1.0:
            _fail("train", "warmup_ratio", self.warmup_ratio, "a fraction in [0, 1), e.g. 0.1")
        if not self.adversarial_epsilon > 0:
            _fail("train", "adversarial_epsilon", self.adversarial_epsilon, "a norm > 0, e.g. 1.0")
        if self.adversarial_steps < 1:
            _fail("train", "adversarial_steps", self.adversarial_steps, "at least 1 step, e.g. 3")
        if not 0.0 <= self.replay <= 10.0:
            _fail("train", "replay", self.replay, "a share of the new training rows from 0 (no replay) to 10, "
                  "e.g. 0.2")
        if self.abstain_below is not None and not 0.0 < self.abstain_below < 1.0:
            _fail("train", "abstain_below", self.abstain_below, "a probability between 0 and 1, e.g. 0.6, or "
                  "leave it out to always answer")

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size


@dataclass
class ChatConfig:
    """Tasks chat and seq2seq: what is generated while the model trains, and the base model's evaluation."""

    max_new_tokens: int = field(default=64, metadata={
        "help": "tokens generated per sample answer (and the default for predict and the chat playground)"})
    sample_prompts: int = field(default=3, metadata={
        "help": "held-out questions answered (seq2seq: sources translated) greedily and logged at each "
                "evaluation; 0 = none"})
    eval_at_start: bool = field(default=True, metadata={
        "help": "evaluate at step 0, before training: the base model's held-out loss and answers"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "task chat: a system message put first in every conversation that has none (training, "
                "held-out evaluation, predict and the playground), e.g. 'You are the support assistant of "
                "Acme; answer in two sentences.' Unset: the chat template's own default, if any"})

    def __post_init__(self) -> None:
        self._check_generation()
        if self.system_prompt is not None and not self.system_prompt.strip():
            _fail("chat", "system_prompt", self.system_prompt, "some text, or leave it out")

    def _check_generation(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            _fail("chat", "max_new_tokens", self.max_new_tokens, f"1 to {MAX_NEW_TOKENS} tokens (typical: 64)")
        if not 0 <= self.sample_prompts <= MAX_SAMPLE_PROMPTS:
            _fail("chat", "sample_prompts", self.sample_prompts,
                  f"0 (none) to {MAX_SAMPLE_PROMPTS} held-out questions (typical: 3)")


MAX_NEW_TOKENS = 2048
MAX_SAMPLE_PROMPTS = 20


@dataclass
class TrackConfig:
    """Experiment trackers besides the run store, which is always on."""

    wandb: Literal["offline", "online", "disabled"] = field(default="offline", metadata={"help": "offline needs no network"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files in the run directory"})
    project: str = field(default="llm-workbench", metadata={"help": "wandb project name"})


@dataclass
class Config:
    """One fine-tuning run."""

    task: Task = field(default=DEFAULT_TASK, metadata={"help": "what the model learns: " + ", ".join(TASK_NAMES)})
    model: str = field(default="minilm-l6", metadata={"help": "catalog name, local directory, or hub id"})
    name: str | None = field(default=None, metadata={"help": "a label for the run in lists and plots"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with a hub model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the labelled text"})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "the tuning method"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the optimisation schedule"})
    track: TrackConfig = field(default_factory=TrackConfig, metadata={"help": "experiment trackers"})
    chat: ChatConfig = field(default_factory=ChatConfig, metadata={
        "help": "tasks chat and seq2seq: sample generations"})

    def __post_init__(self) -> None:
        self._check_task()

    @property
    def task_spec(self):  # noqa: ANN201 - workbench.task_table.TaskSpec
        """The task's row in the task table."""
        return task_spec(self.task)

    def _check_task(self) -> None:
        """Settings that belong to other tasks are refused, never silently ignored (all read from the task
        table: the methods, data columns and sections each task takes)."""
        spec = self.task_spec
        if self.method.name not in spec.methods:
            _fail("method", "name", self.method.name,
                  f"one of {', '.join(spec.methods)} for task: {self.task} ({spec.head})")
        self._check_columns(spec)
        self._check_train_fields(spec)
        if self.data.augment and spec.kind != "encoder":
            _fail("data", "augment", self.data.augment, f"[] for task: {self.task}: augmentation makes rows "
                  "for tasks with a label or value per text (text-classification, text-regression)")
        if self.data.unlabeled_source is not None and not (spec.kind == "encoder" and spec.classes):
            _fail("data", "unlabeled_source", self.data.unlabeled_source, f"left out for task: {self.task}: "
                  "self-training labels texts with a classifier's classes")
        if self.train.adversarial != "off" and self.method.spec.family == "zero-shot":
            _fail("train", "adversarial", self.train.adversarial, f"off for method: {self.method.name}: a "
                  "zero-shot baseline trains no weights for the attack to harden")
        if not spec.generates and self.chat != ChatConfig():
            changed = next(f.name for f in dataclasses.fields(ChatConfig)
                           if getattr(self.chat, f.name) != getattr(ChatConfig(), f.name))
            _fail("chat", changed, getattr(self.chat, changed),
                  f"the default for task: {self.task}; the chat section applies to tasks "
                  f"{' and '.join(GENERATION_TASKS)} only")
        if self.chat.system_prompt is not None and not spec.system_prompt:
            _fail("chat", "system_prompt", self.chat.system_prompt,
                  f"left out for task: {self.task} (no system message: the model reads the source text alone)")

    def _check_columns(self, spec: Any) -> None:
        reads = " and ".join(f"data.{c}" for c in spec.columns)
        for name in ("text_column", "label_column", *CHAT_COLUMNS):
            value = getattr(self.data, name)
            if value is not None and name not in spec.columns:
                _fail("data", name, value, f"nothing for task: {self.task}, which reads {reads}")
        if not spec.languages:
            for name in LANGUAGE_FIELDS:
                if getattr(self.data, name) is not None:
                    owners = " or ".join(tasks_where(languages=True))
                    _fail("data", name, getattr(self.data, name),
                          f"nothing for task: {self.task}; language codes belong to task: {owners}")

    def _check_train_fields(self, spec: Any) -> None:
        """train.* fields that only some tasks read: left at their defaults elsewhere."""
        why_not = "there are no classes to weigh" if spec.kind != "generation" else "class weights apply to " \
                  "classes"
        checks = [("class_weights", "auto", spec.classes, why_not, ("none",)),
                  ("best_metric", "auto", spec.classes, f"{spec.best_metric} picks the best checkpoint", ()),
                  ("ensemble", "auto", spec.classes, "there is no classical model to average with",
                   ("off",) if spec.kind == "encoder" else ()),
                  ("truncation", "head+tail", spec.kind == "encoder", "texts are never cut from their head", ()),
                  ("adversarial", "off", spec.kind in ("encoder", "tokens"), "the attack perturbs the embeddings "
                   "a classifier, regressor or tagger reads; generation is not covered", ()),
                  ("calibrate", True, spec.classes, "there are no class probabilities to calibrate", (False,)),
                  ("abstain_below", None, spec.classes, "only a class answer can abstain", ())]
        for name, default, applies, why, also in checks:
            value = getattr(self.train, name)
            if not applies and value != default and value not in also:
                _fail("train", name, value, f"{default} (the default) for task: {self.task}: {why}")

    # --- conversions -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "Config":
        return _build(cls, raw or {}, path="")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        raw = read_yaml(Path(path))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def with_overrides(self, overrides: list[str]) -> "Config":
        raw = self.to_dict()
        for item in overrides:
            apply_override(raw, item)
        return Config.from_dict(raw)


# --- YAML and overrides ----------------------------------------------------

class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` re-uses a node, and nested aliases expand exponentially (a 1 KB
    "billion laughs" file becomes gigabytes once walked). A config never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise WorkbenchError(f"YAML aliases (*{str(event.anchor)[:40]}) are not allowed in a config, line "
                                 f"{event.start_mark.line + 1}: write the value out")
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML without aliases (see _NoAliasLoader); raises yaml.YAMLError on bad syntax."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping. Errors name the file and the problem, never its content: the path may
    point at anything (`workbench train /etc/shadow`)."""
    name = str(path)[:MAX_SHOWN_CHARS]
    if not path.is_file():
        raise WorkbenchError(f"config file {name!r} not found: give the path of a YAML config")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise WorkbenchError(f"config file {name!r} is {size:,} bytes, more than a config's limit of "
                             f"{MAX_CONFIG_BYTES:,}: give the path of a YAML config (a few lines)")
    not_config = (f"config file {name!r} is not a YAML config: give a file of `key: value` lines "
                  "(task, model, data, ...), e.g. configs/demo.yaml")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise WorkbenchError(not_config + " (it is not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", "") or "")[:MAX_SHOWN_CHARS]
        raise WorkbenchError(f"config file {name!r} is not valid YAML{where} ({problem or 'syntax error'}): "
                             "fix the syntax") from None
    if raw is None:
        raise WorkbenchError(f"config file {name!r} is empty: write at least `task:` and `model:` lines "
                             "(`workbench config` prints every field with its default)")
    if not isinstance(raw, dict):
        raise WorkbenchError(not_config)
    known = {f.name for f in dataclasses.fields(Config)}
    if not any(isinstance(k, str) and k in known for k in raw):
        raise WorkbenchError(not_config + f"; none of its {len(raw)} top-level keys is a config section")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise WorkbenchError(f"--set {shown(item)} must look like section.key=value, e.g. train.epochs=3")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise WorkbenchError(f"--set {shown(item)}: {shown(part, 80)} is not a section")
        node = child
    node[parts[-1]] = value


# --- typed construction ----------------------------------------------------

def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(choices)}"


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "config"
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{where} must be a mapping of keys, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise WorkbenchError(f"unknown config key {shown(path + str(key), 80)}: {_nearest(str(key)[:80], names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, path=f"{path}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{path}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint; only lossless widenings are applied."""
    ok, out = _match(value, hint)
    if ok:
        return out
    raise WorkbenchError(f"{where} = {shown(value)} is not allowed: expected {_describe(hint)}")


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, out = _match(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            matched = [_match(v, item) for v in value]
            if all(ok for ok, _ in matched):
                return True, [v for _, v in matched]
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    return False, None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "nothing (leave it out)"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))
