"""The loop layer: the one training loop (trainer.py), the run lifecycle it shares with the zero-shot
baselines (lifecycle.py, zero_shot.py), checkpoints (checkpoints.py), and the speed pieces it uses
(bucketing.py, precision.py). It drives a task (workbench/tasks/) and never switches on the task's name."""

from __future__ import annotations

from .trainer import preflight, train

__all__ = ["preflight", "train"]
