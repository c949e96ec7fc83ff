"""Faults in the loop: a training process killed (SIGKILL, no cleanup) at a step, in the middle of a checkpoint
write, or between writing a checkpoint and putting it in place; `--resume` must then finish the run with the
same metrics and weights as a run that was never interrupted. And no checkpoint file is ever unpickled."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.loop import train
from workbench.loop.checkpoints import latest_checkpoint

KILLER = textwrap.dedent("""
    import os, sys, json
    from pathlib import Path
    from workbench.config import Config
    from workbench.store import RunStore
    from workbench.loop import train
    from workbench.callbacks import Callback
    import workbench.loop.checkpoints as ckpt

    home, config_file, run_id, where, at = sys.argv[1:6]
    at = int(at)
    config = Config.load(config_file)
    die = lambda: os._exit(137)  # as SIGKILL: no finally, no atexit, no flush
    saves = {"n": 0}
    callbacks = []
    if where == "step":
        class Kill(Callback):
            def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
                if state.global_step == at:
                    die()
        callbacks = [Kill()]
    elif where in ("mid-checkpoint", "before-rename"):
        real_save, real_replace = ckpt.torch.save, Path.replace
        def save(obj, f, *a, **k):  # optimizer.pt: after the weights, before the RNG and progress files
            saves["n"] += 1
            if where == "mid-checkpoint" and saves["n"] == at:
                Path(f).write_bytes(b"half")
                die()
            return real_save(obj, f, *a, **k)
        def replace(self, target):
            if where == "before-rename" and self.name.endswith(".tmp") and "step-" in self.name:
                saves["n"] += 1
                if saves["n"] == at:
                    die()
            return real_replace(self, target)
        ckpt.torch.save, Path.replace = save, replace
    train(config, store=RunStore(home), run_id=run_id, callbacks=callbacks)
    sys.exit(3)  # the kill point was never reached
""")


def _weights(record: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(record["dir"]) / "model" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def fault_config(tiny_model_dir, tiny_csv):
    """12 steps, an evaluation (and a checkpoint) every 3; dropout on, so the restored RNG state matters."""
    from workbench.config import Config

    return Config.from_dict({
        "model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 12, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                  "eval_every": 3, "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})


@pytest.fixture(scope="module")
def reference(fault_config, tmp_path_factory):
    from workbench.store import RunStore

    store = RunStore(tmp_path_factory.mktemp("reference"))
    record = train(fault_config, store=store)
    assert record["status"] == "completed", record["error"]
    return record


@pytest.mark.parametrize("where, at", [("step", 2), ("step", 7), ("mid-checkpoint", 2), ("before-rename", 3)])
def test_a_killed_run_resumes_to_the_same_result(fault_config, reference, store, tmp_path, where, at):
    config_file = tmp_path / "config.yaml"
    fault_config.save(config_file)
    run_id = store.create_run(fault_config.to_dict(), None)
    killed = subprocess.run([sys.executable, "-c", KILLER, str(store.home), str(config_file), run_id, where, str(at)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    leftovers = [p.name for p in (store.run_dir(run_id) / "checkpoints").glob("*.tmp")]
    if where != "step":
        assert leftovers, "the kill was meant to leave a half-written checkpoint behind"
    assert latest_checkpoint(store.run_dir(run_id)) is None or not latest_checkpoint(
        store.run_dir(run_id)).name.endswith(".tmp")

    resumed = train(fault_config, store=store, run_id=run_id, resume=True)
    assert resumed["status"] == "completed", resumed["error"]
    for key in ("accuracy", "eval_loss", "best_step"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-6), key
    ref_w, got_w = _weights(reference), _weights(resumed)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-4, atol=1e-6)
    steps = [p["step"] for p in store.points(run_id, kind="train")]
    assert steps == sorted(set(steps)) == list(range(1, 13)), "each step appears once in the history"


def test_resume_never_unpickles_a_checkpoint(fault_config, store, monkeypatch):
    """Whoever can write a run directory must not run code on resume: every torch.load is weights-only."""
    record = train(fault_config, store=store)
    ckpt = latest_checkpoint(Path(record["dir"]))
    assert not (ckpt / "rng.pt").exists() and json.loads((ckpt / "rng.json").read_text())["python"]
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k.get("weights_only")), real(*a, **k))[1])
    assert train(fault_config, store=store, run_id=record["id"], resume=True)["status"] == "completed"
    assert loads and all(w is True for w in loads)


def test_a_legacy_pickled_rng_that_would_run_code_is_refused(fault_config, store, tmp_path):
    """A checkpoint from before rng.json carries rng.pt: it is read weights-only, so a crafted pickle does
    nothing (the run resumes with fresh random state)."""
    import os
    import pickle

    record = train(fault_config, store=store)
    ckpt = latest_checkpoint(Path(record["dir"]))
    (ckpt / "rng.json").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "rng.pt", "wb") as f:
        pickle.dump({"python": Evil()}, f)
    resumed = train(fault_config, store=store, run_id=record["id"], resume=True)
    assert resumed["status"] == "completed", resumed["error"]
    assert not marker.exists()
