"""The task table: one row per task, and the only place a task's name is spelled.

Config validation, the task registry (`workbench.tasks`), predict, evaluate, export, deploy and the widgets
read a task's row (`task_spec(name)`) and switch on its properties (its kind, view, route, whether it can be
optimised), never on its name. Adding a task is one row here plus its own module in `workbench/tasks/`
(named by `runner`), and a view in `widgets/` when none of the existing ones fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import WorkbenchError

# a text in, a head's output out | a language model's own output: generated text, or the language-modelling loss on
# raw text | a tag per token
Kind = Literal["encoder", "generation", "tokens"]
View = Literal["confusion", "regression", "generation", "entities"]  # the Train tab's evaluation viewer


@dataclass(frozen=True)
class TaskSpec:
    """What one task is, in plain values."""

    name: str
    title: str  # the task chooser's label
    needs: str  # one line: what the data must hold
    kind: Kind
    head: str  # what the pretrained model is given
    methods: tuple[str, ...]  # the tuning methods that apply (names of workbench.methods.METHODS)
    metrics: tuple[str, ...]  # the evaluation's figures, the first the headline
    best_metric: str  # picks the best checkpoint and drives early stopping (auto)
    greater_is_better: bool
    view: View
    route: str  # the served route that answers with a run of this task ("": its runs are not served)
    runner: str  # "module:Class" under workbench.tasks implementing tasks.base.Task
    baseline: bool = False  # a classical baseline is fitted beside every run
    optimizable: bool = False  # `workbench optimize` builds int8 / pruned / ONNX artifacts
    in_dashboard: bool = True  # offered by the dashboard's task chooser (else: CLI and notebooks)
    output: Literal["label", "value", "tags", "text"] = "label"  # what the model answers per input
    export_class: str | None = "AutoModelForSequenceClassification"  # what loads a `workbench export` (None: none)
    # optimiser steps a run gets when train.epochs is left out (2-40 epochs, early stopping ends sooner); a
    # tagger learns from few entity words per sentence: wnut-16 LoRA reached entity F1 0.29 after 2 epochs
    # (232 steps), 0.48 after 3 and 0.53 after 4 of 8 (464 steps)
    target_steps: int = 300
    columns: tuple[str, ...] = ("text_column", "label_column")  # the data.*_column fields it reads
    classes: bool = False  # a label per text from a set: class weights, best_metric and ensembles apply
    languages: bool = False  # data.source_lang / target_lang apply (a model that marks languages)
    system_prompt: bool = False  # chat.system_prompt applies
    # a completed run saves its adapted base model (adapters merged), which later runs start from with
    # `model: run:<id>` (catalog.resolve_model) and the model picker lists
    base_model: bool = False

    @property
    def generates(self) -> bool:
        return self.kind == "generation"


_ENCODER_METHODS = ("full", "head-only", "lora", "qlora", "adalora", "ia3", "prompt-tuning")
_GENERATION_METHODS = ("full", "lora", "qlora")
_LANGUAGE_MODEL_METHODS = ("full", "lora", "qlora", "adalora", "ia3")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("text-classification", "Text classification", "a text column and a label column (2 or more classes)",
             "encoder", "a sequence-classification head (a causal LM scores the label tokens)",
             (*_ENCODER_METHODS, "prefix-tuning", "zero-shot-embedding", "zero-shot-prompt"),
             ("accuracy", "f1_macro"), "accuracy", True, "confusion", "/v1/classify",
             "classification:ClassificationTask", baseline=True, optimizable=True, classes=True),
    TaskSpec("text-regression", "Text regression", "a text column and a numeric column (a score per text)",
             "encoder", "a one-output regression head", _ENCODER_METHODS, ("rmse", "mae", "spearman", "r2"), "rmse",
             False, "regression", "/v1/classify", "regression:RegressionTask", baseline=True, output="value"),
    TaskSpec("token-classification", "Named entities", "sentences as tokens with a BIO tag each (CoNLL or JSONL)",
             "tokens", "a token-classification head", _ENCODER_METHODS[:6], ("f1", "precision", "recall", "accuracy"),
             "f1", True, "entities", "/v1/ner", "token_classification:TokenClassificationTask", output="tags",
             optimizable=True, export_class="AutoModelForTokenClassification", target_steps=600),
    TaskSpec("chat", "Chat", "prompt and answer columns, or a messages column", "generation",
             "a causal LM, the loss on the answers", _GENERATION_METHODS, ("eval_loss", "perplexity"), "eval_loss",
             False, "generation", "/v1/chat/completions", "chat:ChatTask", in_dashboard=False, output="text", export_class=None,
             columns=("prompt_column", "answer_column", "messages_column"), system_prompt=True),
    TaskSpec("seq2seq", "Translation (seq2seq)", "source and target text columns", "generation",
             "an encoder-decoder, the loss on the targets", _GENERATION_METHODS, ("eval_loss", "bleu", "chrf"),
             "eval_loss", False, "generation", "/v1/translate", "seq2seq:Seq2SeqTask", in_dashboard=False, output="text", export_class=None,
             columns=("prompt_column", "answer_column"), languages=True),
    TaskSpec("language-modeling", "Continued pretraining (raw text)",
             "raw text: a .txt file (a document per line), a folder of .txt files (a document each) or a text column",
             "generation", "the model's own language-modelling head: masked LM for an encoder, causal LM for a decoder",
             _LANGUAGE_MODEL_METHODS, ("perplexity", "eval_loss"), "perplexity", False, "generation", "",
             "language_modeling:LanguageModelingTask", in_dashboard=False, output="text", export_class=None,
             columns=("text_column",), base_model=True),
]}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
DEFAULT_TASK = "text-classification"


def task_spec(name: str) -> TaskSpec:
    """The row of a task name (a WorkbenchError naming the choices when there is none)."""
    if name not in TASKS:
        raise WorkbenchError(f"task {name!r} is unknown: choose from {', '.join(TASKS)}")
    return TASKS[name]


def spec_for(runner: str) -> TaskSpec:
    """The row whose `runner` is "module:Class" (how a task module learns its own name and figures)."""
    return next(t for t in TASKS.values() if t.runner == runner)


def tasks_where(**wanted: object) -> tuple[str, ...]:
    """The names of the tasks whose row has every given attribute value (`tasks_where(kind="encoder")`)."""
    return tuple(t.name for t in TASKS.values() if all(getattr(t, k) == v for k, v in wanted.items()))
