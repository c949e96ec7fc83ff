"""Continual learning: a run that starts from a completed run's weights (`train.init_from`) on new data.

What carries over: the previous run's trained parameters (same model, method and task; for classification
the same labels, in the same order, since the head is kept). Against forgetting, a share of the previous
run's training rows is replayed: `train.replay` x the new training rows, drawn with the run's seed, mixed
into the training split (the eval split stays the new data's). How much was forgotten is measured, not
guessed: the previous run's eval split is scored with the weights it starts from and with the new best
weights, and the record keeps both (`metrics.forgetting`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import WorkbenchError
from ..run_paths import RunPaths
from ..store import RunStore
from ..task_table import tasks_where

__all__ = ["Previous", "previous_run", "mix_replay", "load_previous_weights", "forgetting"]


@dataclass
class Previous:
    """The run continued from: its record, its data as it split it, and its eval rows encoded for this model."""

    record: dict[str, Any]
    data: Any
    held: list[dict] | None = None
    before: dict[str, float] | None = None


def previous_run(config: Config, store: RunStore, this_run: str | None = None) -> Previous | None:
    """The completed run `train.init_from` names, checked against this config (None when unset); "latest" is
    the newest completed run of the same task other than this one."""
    if not config.train.init_from:
        return None
    if config.train.init_from == "latest":
        done = [r for r in store.list() if r["id"] != this_run and r["status"] == "completed"
                and (r.get("config") or {}).get("task", config.task) == config.task]
        if not done:
            raise WorkbenchError(f"train.init_from: latest: no completed {config.task} run to continue from: "
                                 "train one first, or name a run id")
        run_id = done[0]["id"]
    else:
        run_id = store.resolve(config.train.init_from)
    record = store.get(run_id)
    if record["status"] != "completed" or not RunPaths.of(record).trainable.is_file():
        raise WorkbenchError(f"train.init_from: run {run_id} is {record['status']} with no trained model: "
                             "continue from a completed run")
    old = Config.from_dict(record["config"])
    for what, mine, theirs in (("task", config.task, old.task), ("model", config.model, old.model),
                               ("method.name", config.method.name, old.method.name)):
        if mine != theirs:
            raise WorkbenchError(f"train.init_from: run {run_id} has {what} {theirs!r}, this config {mine!r}: "
                                 f"continual learning keeps the run's weights, so set {what}: {theirs}")
    if config.task_spec.kind != "encoder":
        covered = " and ".join(tasks_where(kind="encoder"))
        raise WorkbenchError(f"train.init_from covers {covered} runs, not {config.task}: start a new run instead")
    from ..tasks import task_of

    return Previous(record, task_of(old).load_data(old, store.home))


def check_labels(previous: Previous, data: Any) -> None:
    """Classification keeps the previous head: the new data must name the same classes."""
    saved = RunPaths.of(previous.record).labels
    if not hasattr(data, "labels") or not saved.is_file():
        return
    old = json.loads(saved.read_text())
    if list(data.labels) != old:
        raise WorkbenchError(f"train.init_from: run {previous.record['id']} classifies into {old}, the new data "
                             f"has labels {list(data.labels)}: continual learning keeps the head, so the new "
                             "file needs the same classes (add rows of the missing ones)")


def mix_replay(data: Any, previous: Previous, share: float, seed: int) -> dict[str, Any]:
    """Add `share` x len(new training rows) of the previous run's training rows (at most all of them) to the
    training split, in place; returns what was mixed in for the run's info."""
    old = previous.data
    values = "train_labels" if hasattr(data, "train_labels") else "train_values"
    old_rows = list(zip(old.train_texts, getattr(old, values)))
    k = min(len(old_rows), round(share * len(data.train_texts)))
    picked = random.Random(seed).sample(old_rows, k) if k else []
    data.train_texts = list(data.train_texts) + [t for t, _ in picked]
    setattr(data, values, list(getattr(data, values)) + [y for _, y in picked])
    return {"from": previous.record["id"], "replayed_rows": k, "new_rows": len(data.train_texts) - k,
            "replay": share}


def load_previous_weights(built: Any, previous: Previous) -> None:
    """The previous run's trained parameters into the freshly built model (same model and method)."""
    from safetensors.torch import load_file

    from ..models.state import load_trainable_state

    load_trainable_state(built.model, load_file(str(RunPaths.of(previous.record).trainable)))


def forgetting(before: dict[str, float], after: dict[str, float], run_id: str) -> dict[str, Any]:
    """The previous run's eval split scored before and after this run trained, per headline figure."""
    shared = [k for k in before if k in after]
    return {"run": run_id, "before": before, "after": after,
            "change": {k: round(after[k] - before[k], 6) for k in shared}}
