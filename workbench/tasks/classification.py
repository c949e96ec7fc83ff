"""Text classification (`task: text-classification`): one label per text.

An encoder gets a sequence-classification head; a causal LM scores the label tokens after the zero-shot
prompt (models/llm_classifier.py). The loss is cross-entropy, a mean over the batch's rows; evaluation
gathers every held-out row's class probabilities from all processes, and reports accuracy, macro-F1,
per-class figures, the confusion matrix and the most confident mistakes. Under train.truncation "chunks" a
long text is several examples (its chunks, each with the text's label) in training, and its chunks' class
probabilities are averaged into one answer per text in evaluation, predict and serve, so every figure is per
text. The best checkpoint has the
highest accuracy (macro-F1 when train.best_metric says so: by default when the classes are skewed). Beside
the model, the classical baseline is fitted and scored on the same split (tasks/ensemble.py), and the run
answers with their averaged probabilities when that scores higher on the eval split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalog import ModelSource, resolve_model
from ..config import Config
from ..data import Split, prepare
from ..errors import WorkbenchError
from ..metrics import classification_figures, collapse_note
from ..models.built import CHUNK_BATCH, TEXT_INDEX, BuiltModel, pool_chunks, predictor_encodings, text_indices
from ..models.classifier import build_model, check_model_fits
from ..models.head_init import init_head_from_probe
from ..models.state import load_trainable_state, set_seed
from ..privacy import stored_text
from ..task_table import spec_for
from .base import Evaluation, EvalResult
from .ensemble import ENSEMBLE_FILE, EnsemblePredictor, choose_answer, fit_baseline, load_classical
from ..run_paths import LABELS_FILE, RunPaths, TRAINABLE_FILE

PREDICTION_TEXT_CHARS = 600  # a prediction row keeps this much of its text for drill-down


def classification_result(step: int, epoch: float, labels: list[str], y_true: np.ndarray, probs: np.ndarray,
                          eval_loss: float, texts: list[str] | None = None, mask_personal: str = "stored"
                          ) -> EvalResult:
    """One classification evaluation: accuracy and macro-F1; labels, confusion matrix, per-class figures and
    the most confident mistakes for the viewers (their texts masked unless `mask_personal` is "off")."""
    figures, payload, mistakes = classification_figures(labels, y_true, probs, texts, mask_personal)
    return EvalResult(step, float(epoch), float(eval_loss), figures, payload, mistakes)


def pad_batch(tokenizer: Any, encodings: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad token ids on the tokenizer's padding side (left for a causal-LM classifier); `labels` are stacked;
    a chunk's TEXT_INDEX stays out of the batch (the model takes no such input)."""
    labels = [e["labels"] for e in encodings if "labels" in e]
    batch = dict(tokenizer.pad([{k: v for k, v in e.items() if k not in ("labels", TEXT_INDEX)} for e in encodings],
                               return_tensors="pt"))
    if labels:
        batch["labels"] = torch.tensor(labels)
    return batch


def collate(tokenizer: Any, encodings: list[dict[str, Any]], indices: list[int],
            labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A padded batch of the encodings at `indices`, with their labels when given."""
    return pad_batch(tokenizer, [{**encodings[i], **({"labels": labels[i]} if labels is not None else {})}
                                 for i in indices])


@torch.no_grad()
def gather_outputs(model: torch.nn.Module, accelerator: Any, tokenizer: Any, encodings: list[dict],
                   batch_size: int) -> torch.Tensor:
    """The model's logits for every held-out example (a chunk, under truncation "chunks"), in order, gathered
    from all processes: every process holds the same examples, so their TEXT_INDEX says whose each row is."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(encodings), world))
    per_rank = math.ceil(len(encodings) / world)
    mine += mine[-1:] * (per_rank - len(mine))  # equal counts for the gather; duplicates dropped below
    chunks_idx, chunks_logits = [], []
    for start in range(0, per_rank, batch_size):
        idx = mine[start: start + batch_size]
        batch = pad_batch(tokenizer, [{k: v for k, v in encodings[i].items() if k != "labels"} for i in idx])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        chunks_idx.append(torch.tensor(idx, device=accelerator.device))
        chunks_logits.append(logits)
    idx_all = accelerator.gather(torch.cat(chunks_idx)).cpu().numpy()
    logits_all = accelerator.gather(torch.cat(chunks_logits)).cpu()
    _, first = np.unique(idx_all, return_index=True)
    order = idx_all[first].argsort()
    model.train()
    return logits_all[first][order]


def pooled_cross_entropy(logits: torch.Tensor, owners: list[int], labels: list[int]) -> float:
    """The mean over texts of -log(the true class's probability averaged over the text's chunks), row `i` of
    `logits` being a chunk of text `owners[i]`; the plain cross-entropy when each text is one row."""
    n = len(labels)
    if list(owners) == list(range(n)):
        return torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    index = torch.tensor(owners)
    true_log_p = torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(owners)), torch.tensor(labels)[index]]
    top = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, index, true_log_p, "amax")
    sums = torch.zeros(n, dtype=torch.float64).index_add(0, index, torch.exp(true_log_p - top[index]))
    counts = torch.bincount(index, minlength=n).double()
    return float(-(top + torch.log(sums / counts)).mean())


def shown_text(text: str, mode: str) -> str:
    """A text as a predictions file keeps it: its first PREDICTION_TEXT_CHARS characters, masked under
    data.mask_personal `mode` (masked a little past the cut, so an address across it is masked whole)."""
    return stored_text(text[: PREDICTION_TEXT_CHARS + 100], mode)[:PREDICTION_TEXT_CHARS]


def balanced_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """n_rows / (n_classes x rows of the class), scikit-learn's "balanced" class weights."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.ones(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def encoder_run_info(built: BuiltModel) -> dict[str, Any]:
    """What the method did to the model, for the run record."""
    return {
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "trainable_percent": round(100 * built.trainable_params / max(built.total_params, 1), 4),
        "head_modules": built.head_modules,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}),
    }


def chunk_info(train: list[dict], held: list[dict]) -> dict[str, Any]:
    """How many examples the texts became under truncation "chunks" (nothing when each text is one)."""
    if not any(TEXT_INDEX in e for e in train[:1] + held[:1]):
        return {}
    return {"train_chunks": len(train), "eval_chunks": len(held)}


def split_info(split: Split) -> dict[str, Any]:
    r = split.report
    return {
        "labels": split.labels,
        "train_rows": len(split.train_texts),
        "eval_rows": len(split.eval_texts),
        "train_label_counts": split.label_counts("train"),
        "text_column": r.text_column,
        "label_column": r.label_column,
        "data_notes": r.notes + ([f"dropped {r.blank_dropped} blank rows"] if r.blank_dropped else [])
        + ([f"dropped {r.duplicates_dropped} duplicate rows"] if r.duplicates_dropped else []),
    }


def write_json(path: Path, payload: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


SPEC = spec_for("classification:ClassificationTask")


class ClassificationTask:
    name = SPEC.name
    best_metric = SPEC.best_metric
    greater_is_better = SPEC.greater_is_better
    examples = "training rows"

    def load_data(self, config: Config, home: Path) -> Split:
        return prepare(config.data, config.train.seed)

    def train_size(self, data: Split) -> int:
        return len(data.train_texts)

    def check_model(self, config: Config, source: ModelSource, data: Split) -> None:
        check_model_fits(config, source, len(data.labels))

    def build(self, config: Config, source: ModelSource, data: Split, total_steps: int | None) -> BuiltModel:
        built = build_model(config, source, data.labels, total_steps=total_steps)
        built.truncation = config.train.truncation
        if config.train.class_weights == "balanced" and data.train_labels:
            built.class_weights = balanced_weights(data.train_labels, len(data.labels))
        if total_steps is not None and config.train.head_init == "probe":  # training, not loading a run
            if config.train.init_from is not None:  # its head comes from the earlier run
                built.head_init = {"method": "from the earlier run", "run": config.train.init_from}
            elif not config.method.train_head:  # only trained weights are saved: a reload would not find it
                built.head_init = {"method": "random", "why": "method.train_head is false: a head that does not "
                                   "train is not saved with the run, so it keeps the checkpoint's start"}
            else:
                built.head_init = init_head_from_probe(
                    built, data.train_texts, data.train_labels, len(data.labels), config.train.max_length,
                    lambda encodings: pad_batch(built.tokenizer, encodings),
                    config.train.class_weights == "balanced", config.train.seed)
        return built

    def encode(self, config: Config, built: BuiltModel, data: Split) -> tuple[list[dict], list[dict]]:
        def with_labels(texts: list[str], labels: list[Any]) -> list[dict]:
            encoded = built.encode(texts, config.train.max_length)  # prompts for an LLM classifier
            return [{**e, "labels": labels[owner]} for e, owner in zip(encoded, text_indices(encoded))]

        return (with_labels(data.train_texts, data.train_labels), with_labels(data.eval_texts, data.eval_labels))

    def collate(self, built: BuiltModel, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        return pad_batch(built.tokenizer, [examples[i] for i in indices])

    def loss(self, built: BuiltModel, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if built.class_weights is None:
            return model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=built.class_weights.to(logits.device))

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def run_info(self, config: Config, built: BuiltModel, data: Split, train: list[dict],
                 held: list[dict]) -> dict[str, Any]:
        return {**split_info(data), **encoder_run_info(built), **chunk_info(train, held),
                **({"head_init": built.head_init} if built.head_init else {})}

    def eval_at_start(self, config: Config) -> bool:
        return False

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: BuiltModel, data: Split,
                 held: list[dict], step: int, epoch: float) -> Evaluation:
        logits = gather_outputs(model, accelerator, built.tokenizer, held, config.train.effective_eval_batch_size)
        owners = text_indices(held)
        loss = pooled_cross_entropy(logits, owners, data.eval_labels)
        if not math.isfinite(loss):
            raise WorkbenchError(f"evaluation loss is {loss} at step {step}: lower train.learning_rate")
        probs = pool_chunks(torch.softmax(logits, dim=-1).numpy(), owners, len(data.eval_texts))
        result = classification_result(step, epoch, data.labels, np.asarray(data.eval_labels), probs, loss,
                                       data.eval_texts, config.data.mask_personal)
        answered = len(set(probs.argmax(axis=1).tolist())) if len(probs) else 0
        return Evaluation(result, result[config.train.best_metric if config.train.best_metric != "auto"
                                         else self.best_metric], probs,
                          learned=answered > 1 or len(set(data.eval_labels)) < 2)

    def fit_baseline(self, config: Config, data: Split, run_dir: Path) -> dict[str, Any] | None:
        """The classical baseline on this run's split (None when train.baseline is off)."""
        return fit_baseline(config, data.train_texts, data.train_labels, data.eval_texts, data.eval_labels,
                            data.labels, run_dir)

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: Split) -> None:
        """Every eval text's prediction, for drill-down (confusion matrix cells); texts masked as
        data.mask_personal says."""
        probs = evaluation.details
        mode = getattr(data, "mask_personal", "stored")
        rows = [{"index": i, "text": shown_text(data.eval_texts[i], mode), "true": data.labels[y],
                 "predicted": data.labels[int(p.argmax())], "confidence": float(p.max()),
                 "scores": [round(float(v), 6) for v in p]}
                for i, (y, p) in enumerate(zip(data.eval_labels, probs))]
        step = evaluation.result.step
        write_json(RunPaths(run_dir).eval_step(step), {"step": step, "labels": data.labels, "rows": rows})

    def model_files(self, data: Split) -> dict[str, Any]:
        return {LABELS_FILE: data.labels}

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        summary = {k: v for k, v in best.items() if k not in ("seq", "kind", "time", "mistakes")}
        preds = RunPaths(run_dir).eval_step(best['step'])
        summary["predictions_file"] = str(preds) if preds.is_file() else None
        note = collapse_note(best.get("labels") or [], best.get("confusion_matrix") or [])
        if note:
            summary["collapsed"] = note
        rows = json.loads(preds.read_text())["rows"] if preds.is_file() else []
        summary.update(choose_answer(run_dir, rows, best.get("labels") or []))
        return summary

    def load_predictor(self, record: dict[str, Any], home: Path) -> "Predictor":
        from safetensors.torch import load_file

        plan_file = RunPaths.of(record).ensemble
        if plan_file.is_file() and "runs" in json.loads(plan_file.read_text()):
            return self._ensemble_of_runs(record, json.loads(plan_file.read_text()), home)
        config, model_dir = Config.from_dict(record["config"]), trained_model_dir(record)
        labels = json.loads((model_dir / LABELS_FILE).read_text())
        set_seed(config.train.seed)
        built = self.build(config, resolve_model(config.model, home, config.trust_remote_code),
                           _labels_only(labels), None)
        load_trainable_state(built.model, load_file(str(model_dir / TRAINABLE_FILE)))
        model = Predictor(built.model, built.tokenizer, labels, config.train.max_length, record["id"], built.encode)
        if not (model_dir / ENSEMBLE_FILE).is_file():
            return model
        plan = json.loads((model_dir / ENSEMBLE_FILE).read_text())
        # the run chose, on its own eval split, to answer with the model and its classical baseline averaged
        return EnsemblePredictor([model, load_classical(Path(record["dir"]), record["id"])], plan["weights"],
                                 record["id"], ["fine-tuned", "classical"])


    def _ensemble_of_runs(self, record: dict[str, Any], plan: dict[str, Any], home: Path) -> EnsemblePredictor:
        """An ensemble run (workbench.ensembles): its member runs' predictors, and the baseline, averaged."""
        from ..store import RunStore

        store = RunStore(home)
        members = [self.load_predictor(store.get(run_id), home) for run_id in plan["runs"]]
        names = list(plan["runs"])
        if plan.get("baseline"):
            members.append(load_classical(Path(record["dir"]), record["id"]))
            names.append("classical")
        return EnsemblePredictor(members, plan["weights"], record["id"], names)


def _labels_only(labels: list[str]) -> Split:
    """A split that carries only the label names: what building a trained run's model needs."""
    from ..data import DataReport

    return Split([], [], [], [], labels, DataReport("", "", ""))


def trained_model_dir(record: dict[str, Any]) -> Path:
    """<run>/model, refused with the reason when the run has no trained weights yet."""
    model_dir = RunPaths.of(record).model
    if not (model_dir / TRAINABLE_FILE).is_file():
        raise WorkbenchError(f"run {record['id']} has no trained model yet (status {record['status']}): "
                             "wait until it completes an evaluation, or pick another run")
    return model_dir


class Predictor:
    """A trained classifier: `predict(texts)` returns label and per-label scores for each text.

    `encode` turns texts into token ids as the run's training did (BuiltModel.encode: a prompt for a
    causal-LM classifier); left out, the tokenizer reads the text cut to `max_length`.
    """

    task = SPEC.name

    def __init__(self, model: Any, tokenizer: Any, labels: list[str], max_length: int, run_id: str = "",
                 encode: Any = None) -> None:
        self.model, self.tokenizer, self.labels, self.max_length = model.eval(), tokenizer, labels, max_length
        self.run_id = run_id
        self.encode = encode

    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(texts, classes) softmax probabilities, in the order of `labels`; a text read as chunks gets the
        mean of its chunks' probabilities."""
        parts = [torch.softmax(self.logits(texts[i: i + batch_size]), dim=-1).numpy()
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)))

    def logits(self, texts: list[str]) -> torch.Tensor:
        """The model's outputs for one batch of texts, a row per text: the raw logits of a text read as one
        sequence; for a text read as chunks, the log of its chunks' mean probabilities (softmax gives them
        back)."""
        encodings = predictor_encodings(self.tokenizer, self.encode, texts, self.max_length)
        device = next(self.model.parameters()).device
        rows = []
        step = CHUNK_BATCH if len(encodings) > len(texts) else max(1, len(encodings))  # chunks can be many
        for start in range(0, len(encodings), step):
            batch = pad_batch(self.tokenizer, encodings[start: start + step])
            with torch.no_grad():
                rows.append(self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
        logits = torch.cat(rows) if rows else torch.zeros((0, len(self.labels)))
        owners = text_indices(encodings)
        if owners == list(range(len(texts))):
            return logits
        return torch.log(torch.from_numpy(pool_chunks(torch.softmax(logits, dim=-1).numpy(), owners, len(texts))))

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            part = texts[start: start + batch_size]
            probs = torch.softmax(self.logits(part), dim=-1)
            for text, p in zip(part, probs.tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                out.append({"text": text, "label": self.labels[best],
                            "scores": {name: float(s) for name, s in zip(self.labels, p)}})
        return out
