"""A model card for a run: what the model is, what it was trained and measured on, and where it stops working.

`model_card(record)` returns Markdown with a YAML front matter as the Hugging Face Hub reads it (library_name,
pipeline_tag, base_model when it is a hub id, tags, metrics, model-index) and these sections: Model, Intended use
and limits, Training data, Evaluation, Classical baseline, Calibration, Robustness, Slices, Explanations, How to
load, Reproduce. Every figure is read from the run record (config, info, metrics) and the run folder
(`RunPaths`: calibration.json, trust/robustness.json, trust/slices.json, trust/faithfulness.json); a figure that
is not there reads "not measured" with the command that measures it (`MEASURED_BY`). Trust reports are shown
as tables of whatever they hold, so a report with new keys still shows.

Texts from the data (the eval split's mistakes, anything a trust report quotes) are masked with
`privacy.mask_text` whatever `data.mask_personal` says, because a card is written to be published; every
string from the data is escaped, so a label or a text cannot add HTML to a rendered card.
`write_model_card(record, out_dir)` writes the card as `out_dir/README.md` (temp file + os.replace).
"""

from __future__ import annotations

import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .catalog import DATASETS, MODELS
from .errors import WorkbenchError
from .methods import METHODS
from .privacy import mask_text, mask_value
from .run_paths import RunPaths
from .task_table import TASKS, TaskSpec

__all__ = ["CARD_FILE", "MEASURED_BY", "model_card", "write_model_card"]

CARD_FILE = "README.md"  # the name the Hub and most tools read a model directory's card from
# the command that measures a figure a card finds missing ({run}: the run id)
MEASURED_BY = {
    "calibration": "train with `train.calibrate: true` (the default): the temperature is fitted on the eval split",
    "robustness": "run `workbench evaluate {run} TEST_FILE --robustness` (writes trust/robustness.json)",
    "slices": "run `workbench evaluate {run} TEST_FILE` (add --slice-column COL or --slice-terms a,b for more "
              "slices; writes trust/slices.json)",
    "faithfulness": "run `workbench explain {run} --faithfulness` (writes trust/faithfulness.json)",
    "baseline": "train with `train.baseline: true` (the default)",
}
_HUB_METRIC = {"f1_macro": "f1", "spearman": "spearmanr"}  # our figure name -> the Hub's metric type
_PIPELINE = {"label": "text-classification", "value": "text-classification", "tags": "token-classification"}
EXAMPLES = 3  # mistakes quoted from the eval split
EXAMPLE_CHARS = 160  # each quoted text cut to this many characters
TABLE_ROWS = 30  # rows of a trust report's table before "... more"
SMALL_DATA = 1000  # fewer training rows than this earns a limit of its own


# --- formatting -------------------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 4) -> str:
    """A figure as text: floats to `digits` decimals, integers with separators, missing as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.{digits}f}"
    return str(value)


def _text(value: Any) -> str:
    """A string from the data or a report, safe inside Markdown: HTML escaped, one line."""
    return html.escape(" ".join(str(value).split()), quote=False)


def _cell(value: Any) -> str:
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        value = "[" + ", ".join(_num(v) for v in value) + "]"
    elif isinstance(value, list) and _flat(value):
        value = ", ".join(_num(v) for v in value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, default=str)
        value = value if len(value) <= 120 else value[:117] + "..."
    text = _num(value) if not isinstance(value, str) else value
    return _text(text).replace("|", "\\|") or " "


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows[:TABLE_ROWS]]
    if len(rows) > TABLE_ROWS:
        lines.append(f"\n... and {len(rows) - TABLE_ROWS} more rows in the run's report")
    return lines + [""]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accuracy_interval(p: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy `p` measured on `n` rows."""
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _read_json(path: Path) -> Any:
    """A report file's content, or None when it is not there or cannot be read as JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- what the record holds --------------------------------------------------------------------------------------

class _Run:
    """The parts of a run record a card reads, each with a safe default (old runs lack newer fields)."""

    def __init__(self, record: dict[str, Any], export_info: dict[str, Any] | None) -> None:
        self.record = record
        self.id = str(record.get("id", "run"))
        self.name = record.get("name") or self.id
        self.config = record.get("config") or {}
        self.data = self.config.get("data") or {}
        self.train = self.config.get("train") or {}
        self.method = self.config.get("method") or {}
        self.info = record.get("info") or {}
        self.metrics = record.get("metrics") or {}
        self.spec: TaskSpec | None = TASKS.get(self.config.get("task", ""))
        self.paths = RunPaths.of(record) if record.get("dir") else None
        self.export = export_info
        self._reports: dict[str, Any] = {}

    @property
    def title(self) -> str:
        return self.spec.title if self.spec else str(self.config.get("task", "unknown task"))

    @property
    def classes(self) -> bool:
        return bool(self.spec and self.spec.classes)

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in (self.info.get("labels") or self.metrics.get("labels") or [])]

    @property
    def eval_rows(self) -> int | None:
        rows = self.info.get("eval_rows")
        return rows if isinstance(rows, int) and rows > 0 else None

    @property
    def standalone(self) -> bool:
        if self.export is not None:
            return bool(self.export.get("merged"))
        spec = METHODS.get(str(self.method.get("name", "")))
        return spec is not None and spec.family in ("all", "head")

    def measured_by(self, what: str) -> str:
        return MEASURED_BY[what].format(run=self.id)

    def report(self, what: str) -> Any:
        """A trust report (robustness, slices, faithfulness) or the calibration record, masked; None if absent.
        calibration.json (what predict and serve scale by) comes before the record's copy."""
        if what not in self._reports:
            found = _read_json(getattr(self.paths, what)) if self.paths is not None else None
            if found is None and what == "calibration" and isinstance(self.metrics.get("calibration"), dict):
                found = self.metrics["calibration"]
            self._reports[what] = None if found is None else mask_value(found)
        return self._reports[what]


def _base_model(run: _Run) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id when it has one)."""
    model = str(run.config.get("model", ""))
    asset = MODELS.get(model)
    if asset is not None:
        hub = asset.hub_id
        return f"{model} ({asset.description}; licence {asset.licence})", hub
    if Path(model).expanduser().is_dir():
        return f"a local model directory ({Path(model).name})", None
    return model, model or None


def _languages(run: _Run) -> list[str]:
    """The base model's languages, when the catalog names them (else the card says to read the base's card)."""
    asset = MODELS.get(str(run.config.get("model", "")))
    return list(asset.languages) if asset is not None else []


# --- front matter ------------------------------------------------------------------------------------------------

def _front_matter(run: _Run) -> dict[str, Any]:
    """The YAML header the Hub reads: library, pipeline, base model, tags, metric names and model-index."""
    spec = run.spec
    output = spec.output if spec else "label"
    pipeline = _PIPELINE.get(output) or ("translation" if spec and spec.languages else "text-generation")
    meta: dict[str, Any] = {"library_name": "transformers" if run.standalone else "peft", "pipeline_tag": pipeline}
    _, hub = _base_model(run)
    if hub:
        meta["base_model"] = hub
    if _languages(run):
        meta["language"] = _languages(run)
    method = str(run.method.get("name", ""))
    meta["tags"] = [t for t in ("llm-workbench", run.config.get("task"), method) if t]
    figures = [m for m in (spec.metrics if spec else ()) if _is_number(run.metrics.get(m))]
    if figures:
        meta["metrics"] = sorted({_HUB_METRIC.get(m, m) for m in figures})
        source = str(run.data.get("source", ""))
        dataset = source if source in DATASETS else Path(source).name or "data"
        meta["model-index"] = [{"name": str(run.name), "results": [{
            "task": {"type": pipeline, "name": run.title},
            "dataset": {"name": dataset, "type": dataset, "split": "eval"},
            "metrics": [{"type": _HUB_METRIC.get(m, m), "name": m, "value": round(float(run.metrics[m]), 4),
                         **({"args": {"average": "macro"}} if m == "f1_macro" else {})} for m in figures]}]}]
    return meta


# --- sections ---------------------------------------------------------------------------------------------------

def _model_section(run: _Run) -> list[str]:
    base, _ = _base_model(run)
    method = str(run.method.get("name", "?"))
    spec = METHODS.get(method)
    knobs = ", ".join(f"{k} {json.dumps(run.method[k]).strip(chr(34))}" for k in (spec.fields if spec else ()) if k in run.method)
    title = f"{method}: {spec.summary}" if spec else method
    rows = [["task", run.title], ["base model", base], ["method", title], ["method settings", knobs or "-"]]
    if run.info.get("trainable_params"):
        rows.append(["trained parameters", f"{_num(run.info['trainable_params'])} of "
                     f"{_num(run.info.get('total_params'))} ({_num(run.info.get('trainable_percent'), 2)} %)"])
    if run.labels:
        rows.append(["labels", ", ".join(run.labels)])
    rows += [["max length", f"{_num(run.train.get('max_length'))} tokens, truncation "
                            f"{run.train.get('truncation', 'head')}"], ["run", run.id]]
    ended = run.record.get("ended_at")
    if _is_number(ended):
        rows.append(["trained", datetime.fromtimestamp(ended, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                     + f" on {run.info.get('device', '?')}"])
    return ["## Model", "", *_table(["", ""], rows)]


def _limits_section(run: _Run) -> list[str]:
    spec = run.spec
    labels = f" into one of: {', '.join(_text(x) for x in run.labels)}" if run.labels and run.classes else ""
    use = (f"{run.title}{labels}, for texts like its training data ({_dataset_words(run)}), "
           f"with {spec.head if spec else 'its task head'}.")
    lines = ["## Intended use and limits", "", use, "", "Limits:", ""]
    langs = _languages(run)
    lines.append("- Languages: " + (", ".join(langs) if langs else
                 "those of the base model's pretraining data (see its own card)") + ". Texts in other languages, "
                 "or in styles and domains unlike the training data, were not measured here.")
    cut = run.info.get("truncation") or {}
    words = {"head+tail": "its first quarter and last three quarters of tokens are read",
             "head": "only its first tokens are read", "chunks": "it is read as overlapping chunks whose "
             "predictions are averaged"}.get(str(run.train.get("truncation", "head")), "it is cut")
    if run.train.get("truncation") == "chunks":
        lines.append(f"- Length: a text longer than {_num(run.train.get('max_length'))} tokens is read whole, as "
                     "overlapping chunks whose predictions are averaged (at most 16 chunks; a longer text's chunks are "
                     "spread over it)" + (f" ({_num(cut.get('texts_cut'))} of {_num(cut.get('texts_measured'))} "
                                          "training texts were read in chunks)." if cut else ".")
                     + " An exported model reads one chunk: split long texts and average yourself.")
    else:
        lines.append(f"- Length: a text longer than {_num(run.train.get('max_length'))} tokens is not read whole: "
                     f"{words}" + (f" ({_num(cut.get('texts_cut'))} of {_num(cut.get('texts_measured'))} training "
                                   "texts were that long)." if cut else "."))
    rows = run.info.get("train_rows")
    if isinstance(rows, int) and rows < SMALL_DATA:
        lines.append(f"- Small data: trained on {rows:,} rows and measured on {_num(run.eval_rows)}; figures from "
                     "so few rows move by several points with another split or seed.")
    if run.classes:
        lines.append("- Class scores are " + ("calibrated on the eval split (see Calibration), " if
                     run.report("calibration") else "not calibrated: ") + "a score is not a guarantee, and the "
                     "model answers one of its labels even for a text that fits none.")
    lines.append("- Not for decisions about people (hiring, credit, health, law) without a person reviewing each "
                 "answer: nothing here measured fairness across groups of people.")
    return lines + [""]


def _dataset_words(run: _Run) -> str:
    source = str(run.data.get("source", ""))
    if source in DATASETS:
        return f"{source}: {DATASETS[source].description}"
    return f"a local file, {_text(Path(source).name)}" if source else "no source recorded"


def _data_section(run: _Run) -> list[str]:
    source = str(run.data.get("source", ""))
    lines = ["## Training data", "", f"Source: {_dataset_words(run)}"
             + (f" (licence {DATASETS[source].licence})." if source in DATASETS else ".")]
    split = ("a separate eval file" if run.data.get("eval_source") else
             f"{_num(run.data.get('eval_fraction'), 2)} of the source, held out")
    lines += ["", f"Rows: {_num(run.info.get('train_rows'))} for training, {_num(run.eval_rows)} for evaluation "
                  f"({split}).", ""]
    counts = run.info.get("train_label_counts") or run.info.get("train_entity_counts") or {}
    total = sum(v for v in counts.values() if _is_number(v)) or 1
    what = "entities" if "train_entity_counts" in run.info else "rows"
    lines += _table(["class", f"training {what}", "share"],
                    [[k, v, f"{100 * v / total:.1f} %"] for k, v in counts.items() if _is_number(v)])
    if _is_number(run.info.get("target_mean")):
        lines += [f"Target: mean {_num(run.info['target_mean'])}, standard deviation "
                  f"{_num(run.info.get('target_std'))} on the training rows.", ""]
    lines += [f"- {_text(mask_text(str(n)))}" for n in run.info.get("data_notes") or []]
    lines += ["", _masking_words(run), ""]
    decisions = [[d.get("field"), d.get("value"), d.get("why")] for d in run.info.get("decisions") or []
                 if isinstance(d, dict)]
    if decisions:
        lines += ["Settings chosen from the data:", "", *_table(["setting", "value", "why"], decisions)]
    return lines


def _masking_words(run: _Run) -> str:
    mode = run.data.get("mask_personal")
    return {
        "stored": "Personal data (e-mail addresses, phone numbers, card numbers, IP addresses) was masked in "
                  "everything the run stored about its texts (`data.mask_personal: stored`); the model trained on "
                  "the texts as given.",
        "all": "Personal data (e-mail addresses, phone numbers, card numbers, IP addresses) was masked in the "
               "training and eval texts before the model saw them, and in everything the run stored "
               "(`data.mask_personal: all`).",
        "off": "Nothing was masked (`data.mask_personal: off`): the run's stored texts may hold personal data.",
    }.get(mode, "Masking not recorded: this run predates `data.mask_personal`, so its stored texts were not "
                "masked.") + " Texts quoted in this card are masked."


def _evaluation_section(run: _Run) -> list[str]:
    m = run.metrics
    spec = run.spec
    names = [k for k in (*(spec.metrics if spec else ()), "eval_loss") if _is_number(m.get(k))]
    names += [k for k in ("pearson", "r2", "baseline_rmse") if _is_number(m.get(k)) and k not in names]
    if not names:
        return ["## Evaluation", "", "not measured: the run has no evaluation (status "
                f"{run.record.get('status', '?')})", ""]
    chosen_by = run.train.get("best_metric") or (spec.best_metric if spec else "?")
    where = (f"On the eval split ({_num(run.eval_rows)} rows), best checkpoint at step {_num(m.get('step'))} "
             f"(epoch {_num(m.get('epoch'), 1)}), chosen by {chosen_by}.")
    rows = []
    for k in names:
        note = ""
        if k == "accuracy" and run.eval_rows and spec and spec.output == "label":
            low, high = _accuracy_interval(float(m[k]), run.eval_rows)
            note = f"95 % interval {low:.3f} to {high:.3f}"
        elif k == "baseline_rmse":
            note = "predicting the training mean for every text"
        rows.append([k, m[k], note])
    lines = ["## Evaluation", "", where, "", *_table(["figure", "value", ""], rows)]
    per = m.get("per_class") or m.get("per_type") or {}
    per_rows = [[k, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                for k, v in per.items() if isinstance(v, dict)]
    lines += _table(["class" if "per_class" in m else "entity type", "precision", "recall", "f1", "support"],
                    per_rows)
    matrix, labels = m.get("confusion_matrix") or [], m.get("labels") or []
    if matrix and labels and len(matrix) == len(labels) and run.classes:
        lines += ["Confusion matrix (rows: true, columns: predicted):", "",
                  *_table(["", *labels], [[labels[i], *row] for i, row in enumerate(matrix)])]
    return lines + _mistakes(run)


def _mistakes(run: _Run) -> list[str]:
    """The eval split's most confident mistakes (or largest errors), texts masked and cut."""
    step = run.metrics.get("step")
    if run.paths is None or not isinstance(step, int):
        return []
    saved = _read_json(run.paths.eval_step(step)) or {}
    rows = [r for r in saved.get("rows") or [] if isinstance(r, dict) and "text" in r and "true" in r]
    if run.classes:
        wrong = sorted((r for r in rows if r.get("predicted") != r["true"]), key=lambda r: -(r.get("confidence") or 0))
        picked = [[r["true"], r.get("predicted"), r.get("confidence"), r["text"]] for r in wrong[:EXAMPLES]]
        header = ["true", "predicted", "confidence", "text (masked)"]
    elif rows and _is_number(rows[0].get("predicted")):
        wrong = sorted(rows, key=lambda r: -abs(float(r["predicted"]) - float(r["true"])))
        picked = [[r["true"], r["predicted"], float(r["predicted"]) - float(r["true"]), r["text"]]
                  for r in wrong[:EXAMPLES]]
        header = ["true", "predicted", "error", "text (masked)"]
    else:
        return []
    for row in picked:
        text = mask_text(str(row[-1]))
        row[-1] = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 3] + "..."
    return (["Most confident mistakes on the eval split:" if run.classes else "Largest errors on the eval split:",
             "", *_table(header, picked)] if picked else [])


def _baseline_section(run: _Run) -> list[str]:
    lines = ["## Classical baseline", ""]
    spec = run.spec
    base = run.metrics.get("baseline") or (run.info.get("baseline") if isinstance(run.info.get("baseline"), dict)
                                           else None)
    if not (spec and spec.baseline):
        return lines + ["Does not apply: there is no classical baseline for this task.", ""]
    if not isinstance(base, dict):
        return lines + [f"not measured: {run.measured_by('baseline')}.", ""]
    shared = [k for k in spec.metrics if _is_number(base.get(k)) and _is_number(run.metrics.get(k))]
    lines += [f"{_text(base.get('method', 'classical model'))}, fitted on the same training rows and scored on the "
              "same eval split:", ""]
    lines += _table(["figure", "fine-tuned model", "classical baseline"],
                    [[k, run.metrics[k], base[k]] for k in shared])
    headline = spec.best_metric if spec.best_metric in shared else (shared[0] if shared else None)
    if headline is not None:
        model, classical = float(run.metrics[headline]), float(base[headline])
        better = model > classical if spec.greater_is_better else model < classical
        if not better:
            lines.append(f"The fine-tuned model is not better than the classical baseline on {headline} "
                         f"({model:.4f} vs {classical:.4f}): the baseline is smaller and faster, and as good here.")
        elif headline == "accuracy" and run.eval_rows:
            low, high = _accuracy_interval(model, run.eval_rows)
            if low <= classical:
                lines.append(f"The gap on accuracy ({model - classical:+.4f}) is within the 95 % interval of "
                             f"{run.eval_rows} eval rows ({low:.3f} to {high:.3f}).")
    answer = run.metrics.get("answers_with") or {}
    if answer.get("by"):
        lines.append(f"The run answers with: {_text(answer['by'])} ({_text(answer.get('why', ''))}).")
    return lines + [""]


def _calibration_section(run: _Run) -> list[str]:
    lines = ["## Calibration", ""]
    if not run.classes:
        return lines + ["Does not apply: this task answers without class probabilities.", ""]
    abstain = run.train.get("abstain_below")
    abstain_words = (f"Abstains below {abstain}: an answer whose top calibrated probability is under it is "
                     "'uncertain'." if abstain is not None else "Abstain threshold: none (`train.abstain_below` "
                     "not set): the run always answers.")
    cal = run.report("calibration")
    if not isinstance(cal, dict):
        why = "`train.calibrate` was off; " if run.train.get("calibrate") is False else ""
        return lines + [f"not measured: {why}{run.measured_by('calibration')}.", "", abstain_words, ""]
    t = cal.get("temperature")
    reading = ("" if not _is_number(t) else " (above 1: the model was overconfident)" if t > 1.0001 else
               " (below 1: the model was underconfident)" if t < 0.9999 else " (1: left unscaled)")
    rows = [["method", cal.get("method", "?")], ["temperature", f"{_num(t)}{reading}"],
            ["ECE before", cal.get("ece_before")], ["ECE after", cal.get("ece_after")]]
    rows += [[k.replace("_", " ").replace("nll", "NLL"), cal[k]] for k in ("nll_before", "nll_after") if k in cal]
    rows += [["rows", cal.get("rows")]] + ([["fitted on", cal["of"]]] if cal.get("of") else [])
    lines += _table(["", ""], rows)
    lines += [f"- {_text(cal[k])}" for k in ("note", "kept_identity") if cal.get(k)]
    bins = [b for b in cal.get("bins_after") or [] if isinstance(b, dict) and b.get("count")]
    if bins:
        lines += ["", "Reliability after scaling (bins with rows):", "",
                  *_table(["confidence bin", "rows", "mean confidence", "accuracy"],
                          [[f"{_num(b.get('lower'), 1)}-{_num(b.get('upper'), 1)}", b.get("count"),
                            b.get("confidence"), b.get("accuracy")] for b in bins])]
    return lines + ["", abstain_words, ""]


def _flat(value: Any) -> bool:
    """A value that fits one table cell: a scalar, or a list of scalars."""
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return not isinstance(value, dict)


def _report_tables(value: Any, skip: tuple[str, ...] = (), title: str = "") -> list[str]:
    """A trust report of any shape as tables: its plain figures, then one table per nested part (but `skip`);
    nested parts of a table's rows (each perturbation's examples) are left to the report itself."""
    heading = [f"{_text(title)}:", ""] if title else []
    if isinstance(value, list):
        rows = [v for v in value if isinstance(v, dict)]
        if not rows:
            return [f"{_text(title) or 'values'}: " + ", ".join(_cell(v) for v in value), ""]
        nested = list(dict.fromkeys(c for v in rows for c in v if not _flat(v[c])))
        columns = [c for c in dict.fromkeys(c for v in rows for c in v) if c not in nested]
        left = [f"({', '.join(nested)} of each row: in the run's report)", ""] if nested else []
        return heading + _table(columns, [[v.get(c) for c in columns] for v in rows]) + left
    if not isinstance(value, dict):
        return heading + [_cell(value), ""]
    plain = [[k, v] for k, v in value.items() if _flat(v) and k not in skip]
    lines = heading + _table(["figure", "value"], plain) if plain else []
    for key, part in value.items():
        if key in skip or _flat(part) or not part:
            continue
        name = f"{title} {key}".strip()
        if isinstance(part, dict) and all(isinstance(v, dict) for v in part.values()):
            columns = list(dict.fromkeys(c for v in part.values() for c in v if _flat(v[c])))
            lines += [f"{_text(name)}:", "", *_table(["", *columns], [[k, *(v.get(c) for c in columns)]
                                                                      for k, v in part.items()])]
        else:
            lines += _report_tables(part, title=name)
    return lines


def _trust_section(run: _Run, what: str, title: str, intro: str) -> list[str]:
    lines = [f"## {title}", ""]
    found = run.report(what)
    if found is None and not (run.spec and run.spec.kind == "encoder"):
        return lines + ["not measured: the trust reports measure text classification and regression runs.", ""]
    if found is None:
        return lines + [f"not measured: {run.measured_by(what)}.", ""]
    lines += [intro, ""]
    skip: tuple[str, ...] = ()
    if what == "slices" and isinstance(found, dict) and isinstance(found.get("flagged"), list):
        names = [_slice_name(f) for f in found["flagged"]]
        lines += [("Flagged (a gap this report marks): " + "; ".join(_text(n) for n in names) + ".") if names
                  else "No slice flagged.", ""]
        skip = ("flagged",)
    if what == "faithfulness" and isinstance(found, dict) and _is_number(found.get("ratio")):
        lines += [f"Ratio of the two: {_num(found['ratio'], 2)} (above 1: removing the words an explanation ranks "
                  "highest changes the answer more than removing random words).", ""]
    return lines + _report_tables(found, skip)


def _slice_name(flagged: Any) -> str:
    """A flagged slice in words: its name (or its words: kind, group, value) and its figures."""
    if not isinstance(flagged, dict):
        return str(flagged)
    name = flagged.get("slice") or flagged.get("name") or " ".join(
        str(v) for k, v in flagged.items() if isinstance(v, str))
    figures = ", ".join(f"{k} {_num(flagged[k])}" for k in ("rows", "accuracy", "gap", "rmse")
                        if _is_number(flagged.get(k)))
    return f"{name} ({figures})" if figures else str(name)


def _load_section(run: _Run) -> list[str]:
    lines = ["## How to load", ""]
    spec = run.spec
    info = run.export
    if info is None:
        return lines + [f"This card describes run {run.id}, not an export: `workbench export {run.id} --merge` writes "
                        "a model directory with this card as its README.md; `workbench predict "
                        f"{run.id} --text ...` answers with the run itself.", ""]
    cls = spec.export_class if spec and spec.export_class else "AutoModelForSequenceClassification"
    loader = "AutoModelForCausalLM" if info.get("classifier") else cls
    if info.get("merged"):
        code = [f"from transformers import {loader}, AutoTokenizer", "",
                f'model = {loader}.from_pretrained("path/to/this/directory")']
    else:
        base = info.get("base_model", "<base model>")
        extra = "" if info.get("classifier") else f", num_labels={len(info.get('labels') or [])}"
        code = [f"from peft import PeftModel", f"from transformers import {loader}, AutoTokenizer", "",
                f'base = {loader}.from_pretrained("{base}"{extra})',
                'model = PeftModel.from_pretrained(base, "path/to/this/directory")']
    code.append('tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")')
    lines += ["```python", *code, "```", "", f"In one line, as the export records it: `{info.get('load', '')}`", ""]
    trunc = info.get("truncation") or {}
    if trunc.get("mode") and trunc["mode"] != "head":
        lines.append(f"- The run reads a long text as `{trunc['mode']}` within {trunc.get('max_length')} tokens; "
                     "a tokenizer called with `truncation=True` keeps only the head, so answers on long texts differ "
                     "from the run's.")
    cal = run.report("calibration")
    if isinstance(cal, dict) and _is_number(cal.get("temperature")) and cal["temperature"] != 1:
        lines.append(f"- These weights give uncalibrated scores: divide the logits by the temperature "
                     f"{cal['temperature']:.4g} before the softmax for the calibrated probabilities.")
    if run.train.get("abstain_below") is not None:
        lines.append(f"- The run answers 'uncertain' below a top probability of {run.train['abstain_below']}; "
                     "these weights always answer.")
    lines += [f"- {_text(info[k])}" for k in ("note", "answers_with") if info.get(k)]
    return lines + [""]


def _reproduce_section(run: _Run) -> list[str]:
    config = yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True).rstrip()
    return ["## Reproduce", "", "The run's resolved config; `workbench train config.yaml` trains it again (the "
            "data source must be there too):", "", "```yaml", config.replace("```", "'''"), "```", ""]


# --- the card ---------------------------------------------------------------------------------------------------

def model_card(record: dict[str, Any], export_info: dict[str, Any] | None = None) -> str:
    """The model card of a run record (`RunStore.get`) as Markdown with a Hub YAML front matter. `export_info`:
    the export's workbench_export.json content when the card goes with an export (its load lines)."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise WorkbenchError("model_card needs a run record with its config: pass RunStore(home).get(run_id)")
    run = _Run(record, export_info)
    method = run.method.get("name", "?")
    head = yaml.safe_dump(_front_matter(run), sort_keys=False, allow_unicode=True)
    body = [f"# {_text(run.name)}", "",
            f"A {run.title.lower()} model: {_text(run.config.get('model', '?'))} tuned with {method} by LLM "
            f"Workbench (run {run.id}). Every figure below is read from the run's record and reports.", ""]
    body += _model_section(run) + _limits_section(run) + _data_section(run) + _evaluation_section(run)
    body += _baseline_section(run) + _calibration_section(run)
    body += _trust_section(run, "robustness", "Robustness", "Accuracy under perturbed inputs and the confidence "
                           "shift on out-of-domain texts, as the robustness report holds them:")
    body += _trust_section(run, "slices", "Slices", "Figures on slices of a labelled file (by length, terms, the "
                           "file's own columns), beside the overall figure, as the slice report holds them:")
    body += _trust_section(run, "faithfulness", "Explanations", "How much the prediction depends on the tokens an "
                           "explanation ranks highest (comprehensiveness: top-k removed vs random-k removed):")
    body += _load_section(run) + _reproduce_section(run)
    return f"---\n{head}---\n\n" + "\n".join(body).rstrip() + "\n"


def write_model_card(record: dict[str, Any], out_dir: str | Path, export_info: dict[str, Any] | None = None) -> Path:
    """Write the run's card as `out_dir`/README.md (a temp file renamed into place) and return its path."""
    out = Path(out_dir)
    if not out.is_dir():
        raise WorkbenchError(f"cannot write a model card into {str(out)!r}: it is not a directory; give an "
                             "existing directory (an export's)")
    target = out / CARD_FILE
    tmp = out / f".{CARD_FILE}.tmp-{os.getpid()}"
    tmp.write_text(model_card(record, export_info), encoding="utf-8")
    os.replace(tmp, target)
    return target
