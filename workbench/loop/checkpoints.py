"""Checkpoints: our own small, safe format, so that a resumed run continues exactly where it stopped.

A checkpoint is a folder: the trainable parameters (safetensors), the optimiser and scheduler state (tensors
and numbers, loaded with `weights_only=True`), the random generators' state (JSON and a safetensors tensor:
no pickle is ever loaded, so a run directory from someone else cannot run code on resume) and the loop's
progress (JSON). It is written to `<name>.tmp` and renamed, so a kill mid-write leaves the previous
checkpoint intact and a `.tmp` folder that every reader skips.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.state import load_trainable_state, trainable_state
from ..run_paths import PROGRESS_FILE, RunPaths, TRAINABLE_FILE

TMP = ".tmp"


@dataclass
class Progress:
    """What a checkpoint must remember besides weights and optimiser state."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_learned: bool = True  # the best evaluation's model told classes apart (Evaluation.learned)
    evals_without_improvement: int = 0
    train_seconds: float = 0.0  # optimiser steps only
    eval_seconds: float = 0.0


def rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """Python's and numpy's generator states as JSON values, torch's as a tensor."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return state, torch.get_rng_state()


def set_rng_state(state: dict[str, Any], torch_state: torch.Tensor) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, progress: Progress) -> None:
    """Write atomically: a half-written checkpoint never replaces a good one."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    state, torch_state = rng_state()
    save_file({"torch": torch_state}, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(state))
    (tmp / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))  # written last: marks a complete folder
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> Progress:
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(path / TRAINABLE_FILE)))
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if (path / "rng.json").is_file():
        set_rng_state(json.loads((path / "rng.json").read_text()), load_file(str(path / "rng.safetensors"))["torch"])
    else:  # a checkpoint from before rng.json: its rng.pt is a pickle, read without running any code
        _load_legacy_rng(path / "rng.pt")
    return Progress(**json.loads((path / PROGRESS_FILE).read_text()))


def _load_legacy_rng(path: Path) -> None:
    """rng.pt of earlier versions, through torch's weights-only unpickler (numpy types allow-listed); a file
    that needs anything else is skipped: the run resumes with fresh random state, never runs its code."""
    if not path.is_file():
        return
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType, core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            rng = torch.load(path, weights_only=True)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    except Exception:  # noqa: BLE001 - an unreadable legacy state only costs bit-exact dropout masks
        return


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (`.tmp` folders of a kill mid-write are skipped)."""
    complete = [c for c in (RunPaths(run_dir).checkpoints).glob("step-*")
                if not c.name.endswith(TMP) and c.name[5:].isdigit() and (c / PROGRESS_FILE).is_file()]
    return max(complete, key=lambda c: int(c.name[5:]), default=None)


def keep_only(path: Path) -> None:
    """Remove every other step checkpoint (and leftover .tmp folders): the newest is the resumable one."""
    for old in path.parent.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)


def mark_best(path: Path) -> None:
    """Copy the checkpoint to checkpoints/best, atomically."""
    best, tmp = path.parent / "best", path.parent / ("best" + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    shutil.rmtree(best, ignore_errors=True)
    tmp.replace(best)


def save_model(run_dir: Path, model: torch.nn.Module, files: dict[str, Any]) -> None:
    """<run>/model: the trained parameters and the task's JSON files, replaced atomically."""
    from safetensors.torch import save_file

    out, tmp = RunPaths(run_dir).model, run_dir / ("model" + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
    for name, payload in files.items():
        (tmp / name).write_text(json.dumps(payload))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
