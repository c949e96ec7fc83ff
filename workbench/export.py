"""Export a finished run as a model directory that needs neither the workbench nor the run store.

Two shapes:

- merged (`merge=True`, and always for full and head-only): a plain transformers model directory
  (safetensors weights, config with the labels, tokenizer), loadable with
  `AutoModelForSequenceClassification.from_pretrained(out)`. Adapters of lora, adalora and ia3 are
  merged into the base weights with peft's merge_and_unload. A qlora run is merged into a freshly
  loaded float32 base: its adapters were trained against the 4-bit weights, so the merged model
  differs from the run by the quantisation error (small, not zero).
- unmerged (peft methods without `merge`): a peft adapter directory (adapter_config.json,
  adapter_model.safetensors) plus tokenizer and labels, loadable with `PeftModel.from_pretrained`
  on the base model. prompt-tuning and prefix-tuning can only be exported this way: their virtual
  tokens are an input to the model, not a change of its weights.

A causal-LM classifier (models/llm_classifier.py) exports its causal LM the same two ways, loaded with
`AutoModelForCausalLM` (or PeftModel on it); the export info holds what classifying with it takes: the
prompt, each label's token ids and the scoring (`workbench.models.prompting.score_labels` does it).

A chat run exports for the engines that serve LLMs (deploy/engines_export.py): `format="gguf"`, the adapters merged
into the base and written as one model.gguf with an Ollama Modelfile beside it; `format="vllm"`, a directory vLLM
serves (the merged model, or with `merge` false the base model plus the LoRA adapter) with SERVE.md naming the
command.

Every export holds the run's model card as README.md (model_card.py: data, eval figures, the classical
baseline, calibration, robustness, slices, intended use and limits, the load lines); it replaces the one peft's
save_pretrained writes.

The directory is written next to its destination and renamed into place, so an interrupted export
never leaves a half-written model where a good one was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

from .config import VIRTUAL_TOKEN_METHODS, Config
from .errors import WorkbenchError
from .methods import float_twin, method_spec, methods_where
from .model_card import write_model_card
from .task_table import TASKS
from .run_paths import LABELS_FILE, RunPaths, TRAINABLE_FILE

MERGEABLE = methods_where(merges=True)
EXPORT_INFO = "workbench_export.json"
ExportFormat = Literal["hf", "gguf", "vllm"]


def export_run(run_id: str = "latest", out: str | Path | None = None, merge: bool = False,
               home: str | Path | None = None, force: bool = False, format: ExportFormat = "hf",
               precision: Literal["f16", "f32"] = "f32") -> Path:
    """Write the run's best model to `out` (default <home>/exports/<run id>) and return that path.

    `format`: "hf" (a transformers or peft directory), or for a chat run "gguf" (model.gguf in `precision` and an
    Ollama Modelfile) or "vllm" (a directory vLLM serves; with `merge` false, the base plus a LoRA adapter)."""
    from safetensors.torch import load_file

    from .catalog import resolve_model
    from .deploy.engines_export import ENGINE_FORMATS, check_engine_export, engine_exportable, export_for_engine
    from .models.adapters import merge_adapters, peft_model_of
    from .models.llm_classifier import LLMClassifier, export_info
    from .models.state import load_trainable_state, set_seed
    from .store import RunStore

    store = RunStore(home)
    record = store.get(run_id)
    run = record["id"]
    model_dir = RunPaths.of(record).model
    if not (model_dir / TRAINABLE_FILE).is_file():
        raise WorkbenchError(f"run {run} has no trained model to export (status {record['status']}): "
                             "wait until it completes an evaluation, or pick another run")
    config = Config.from_dict(record["config"])
    if format != "hf":
        check_engine_export(config, run, format)
        target = Path(out).expanduser().resolve() if out is not None else export_dir(run, store.home)
        _check_target(target, force)
        return _write_export(target, lambda tmp: export_for_engine(record, store.home, tmp, format, merge, precision,
                                                                   final=target), record)
    spec = config.task_spec
    if spec.export_class is None:
        exportable = ", ".join(t.name for t in TASKS.values() if t.export_class)
        engines = f" (a chat run: --format {' or '.join(ENGINE_FORMATS)})" if engine_exportable(config) else ""
        raise WorkbenchError(f"run {run} is a task: {config.task} run, and export handles {exportable} runs only so "
                             f"far{engines}: its adapter weights are in {model_dir / TRAINABLE_FILE}, and "
                             f"`workbench predict {run} --text ...` uses them")
    method = config.method.name
    _check_merge(run, method, merge)
    target = Path(out).expanduser().resolve() if out is not None else export_dir(run, store.home)
    _check_target(target, force)

    build_config = config
    if merge and float_twin(method) != method:  # merge into a float32 base: a 4-bit base cannot hold merged weights
        build_config = dataclasses.replace(config, method=dataclasses.replace(config.method, name=float_twin(method)))
    source = resolve_model(config.model, store.home, config.trust_remote_code)
    set_seed(config.train.seed)  # layers the run left frozen and random (a pooler) start as they did
    labels, built = _rebuild(build_config, source, RunPaths.of(record))
    load_trainable_state(built.model, load_file(str(model_dir / TRAINABLE_FILE)))

    standalone = merge or method_spec(method).family in ("all", "head")
    model = peft_model_of(built.model)  # a causal-LM classifier exports its causal LM
    model = merge_adapters(model) if merge and method in MERGEABLE else model
    info = _export_info(run, config, source.path, labels, standalone, causal=getattr(built, "prompt", None) is not None)
    if isinstance(built.model, LLMClassifier):
        info["classifier"] = export_info(built.prompt, built.model)
    added = _added_tokens(config, RunPaths.of(record))
    if added and not standalone:  # the adapter holds the grown embedding: the base must grow to match first
        info["load"] = info["load"].replace("); PeftModel", "); base.resize_token_embeddings(len(AutoTokenizer."
                                            "from_pretrained(<this directory>))); PeftModel")
        info["added_tokens"] = len(added)
    info["truncation"] = {"max_length": config.train.max_length, "mode": config.train.truncation}
    answer = (record.get("metrics") or {}).get("answers_with") or {}
    if answer.get("by") == "ensemble":  # the run answers with its baseline too; a transformers model cannot
        info["answers_with"] = ("this is the fine-tuned model alone; the run answers as an ensemble with its "
                                f"classical baseline ({answer.get('why', '')}): serve the run itself for that answer")

    def write(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(tmp)  # safetensors
        built.tokenizer.save_pretrained(tmp)
        (tmp / LABELS_FILE).write_text(json.dumps(labels))
        return info

    return _write_export(target, write, record)


def _write_export(target: Path, write: Callable[[Path], dict[str, Any]], record: dict[str, Any]) -> Path:
    """Run `write(tmp)` in a fresh directory beside `target`, add the export info it returns and the model card,
    and rename the directory into place."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = write(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        write_model_card(record, tmp, info)  # after save_pretrained: peft writes a README.md of its own
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_dir(run_id: str, home: str | Path) -> Path:
    """Where `export_run` writes a run's export when no `out` is given: <home>/exports/<run id>."""
    return Path(home) / "exports" / run_id


def read_export_info(directory: str | Path) -> dict[str, Any] | None:
    """An export directory's workbench_export.json, or None when the directory holds no export."""
    path = Path(directory) / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def _rebuild(config: Config, source: Any, paths: RunPaths) -> tuple[list[str], Any]:
    """(the head's labels, the model built as the run trained it) for the run's task: a sequence classifier
    (labels.json; regression: one "value"), or a token classifier (tags.json)."""
    spec = config.task_spec
    if spec.output == "tags":
        from .models.token_classifier import build_token_classifier

        saved = json.loads(paths.tags.read_text())
        tags = saved["tags"]
        return tags, build_token_classifier(config, source, tags, added_tokens=saved.get("added_tokens") or [])
    from .models.classifier import build_model

    regression = spec.output == "value"
    labels = ["value"] if regression else json.loads(paths.labels.read_text())
    return labels, build_model(config, source, labels, regression=regression)


def _added_tokens(config: Config, paths: RunPaths) -> list[str]:
    """The characters a tagging run added to its tokenizer (tags.json), else none."""
    if config.task_spec.output != "tags":
        return []
    return json.loads(paths.tags.read_text()).get("added_tokens") or []


def _check_merge(run: str, method: str, merge: bool) -> None:
    if merge and method in VIRTUAL_TOKEN_METHODS:
        raise WorkbenchError(
            f"run {run} used {method}: its virtual tokens are an input to the model, not a change of its "
            "weights, so they cannot be merged into the base model. Export without --merge (a peft adapter "
            "directory, loaded with PeftModel.from_pretrained on the base model)")


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise WorkbenchError(f"--out {str(target)!r} is a file: give a directory path")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise WorkbenchError(f"--out {str(target)!r} is not empty: choose another directory, or add --force "
                             "to replace an earlier export")
    if not (target / EXPORT_INFO).is_file():  # --force never deletes a directory we did not write
        raise WorkbenchError(f"--out {str(target)!r} is not empty and holds no earlier export ({EXPORT_INFO} "
                             "missing), so --force will not replace it: choose an empty or new directory")


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished export into place; an earlier export is removed only once the new one is there."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.replace(old)
    tmp.replace(target)
    shutil.rmtree(old, ignore_errors=True)


def _export_info(run: str, config: Config, base: str, labels: list[str], standalone: bool,
                 causal: bool = False) -> dict[str, Any]:
    method = config.method.name
    if causal:
        load = ("AutoModelForCausalLM.from_pretrained(<this directory>)" if standalone else
                "base = AutoModelForCausalLM.from_pretrained(<base_model>); "
                "PeftModel.from_pretrained(base, <this directory>)")
        load += "; classify by scoring the label tokens after the prompt (see 'classifier')"
    elif standalone:
        load = f"{config.task_spec.export_class}.from_pretrained(<this directory>)"
    else:
        load = (f"base = {config.task_spec.export_class}.from_pretrained(<base_model>, "
                f"num_labels={len(labels)}); PeftModel.from_pretrained(base, <this directory>)")
    info: dict[str, Any] = {
        "run_id": run,
        "method": method,
        "merged": standalone,
        "base_model": base,
        "labels": labels,
        "max_length": config.train.max_length,
        "load": load,
    }
    if method_spec(method).quantized and standalone:
        info["note"] = ("merged into a float32 base; the run trained against 4-bit weights, so "
                        "probabilities differ from the run's by the quantisation error")
    if not standalone and not config.method.train_head and not causal:
        info["note"] = ("method.train_head was false: layers missing from the base checkpoint (a pooler) are "
                        "not in the adapter and start random when the base loads; export with --merge to keep them")
    return info
