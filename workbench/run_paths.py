"""The run folder's layout: every file name of `<home>/runs/<id>/` is spelled here and nowhere else.

    config.yaml                  the config as asked for (store.py writes it; the record holds the resolved one)
    log.txt                      the run's output and any traceback (owner-only)
    outcome.json                 how a launched run ended, when its process could not write the store
    model/trainable.safetensors  the best model's trained parameters (no pickle)
    model/labels.json            classification: the class names, in the head's order
    model/task.json              regression: the target's mean and std; generation: the task
    model/tags.json              token classification: the tag names, in the head's order
    model/ensemble.json          present when the run answers as an ensemble
    model/pretrained/            language-modeling: the adapted base model (adapters merged), for model: run:<id>
    eval/step-N.json             each evaluation's predictions (or samples), for drill-down
    checkpoints/step-N/          the newest resumable checkpoint; checkpoints/best/ the best one
    classical/                   the classical baseline: its files, eval probabilities and figures
    calibration.json             the fitted temperature, ECE before and after, reliability bins
    trust/                       faithfulness of explanations, robustness and slice reports (JSON)
    deploy/                      optimised artifacts (deploy/<name>/artifact.json), their report, the server's state

Other code asks a `RunPaths` for a path (`RunPaths.of(record).trainable`) and never joins these names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINABLE_FILE = "trainable.safetensors"  # in model/ and in every checkpoint
LABELS_FILE = "labels.json"
TASK_FILE = "task.json"
TAGS_FILE = "tags.json"
ENSEMBLE_FILE = "ensemble.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
OUTCOME_FILE = "outcome.json"
PRETRAINED_DIR = "pretrained"  # in model/: a language-modeling run's base model, adapters merged
CALIBRATION_FILE = "calibration.json"
FAITHFULNESS_FILE = "faithfulness.json"
ROBUSTNESS_FILE = "robustness.json"
SLICES_FILE = "slices.json"
PROGRESS_FILE = "progress.json"  # in a checkpoint: written last, so its presence marks a complete one


@dataclass(frozen=True)
class RunPaths:
    """The paths inside one run folder."""

    root: Path

    @classmethod
    def of(cls, record: dict[str, Any]) -> "RunPaths":
        """The paths of a stored run record (its "dir")."""
        return cls(Path(record["dir"]))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def outcome(self) -> Path:
        return self.root / OUTCOME_FILE

    @property
    def model(self) -> Path:
        """model/: the best model's trained parameters and the task's files (replaced atomically)."""
        return self.root / "model"

    @property
    def trainable(self) -> Path:
        return self.model / TRAINABLE_FILE

    @property
    def labels(self) -> Path:
        return self.model / LABELS_FILE

    @property
    def task_file(self) -> Path:
        return self.model / TASK_FILE

    @property
    def tags(self) -> Path:
        return self.model / TAGS_FILE

    @property
    def pretrained(self) -> Path:
        """model/pretrained/: a continued-pretraining run's model with its adapters merged (model: run:<id>)."""
        return self.model / PRETRAINED_DIR

    @property
    def ensemble(self) -> Path:
        return self.model / ENSEMBLE_FILE

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_step(self, step: int) -> Path:
        """eval/step-N.json: one evaluation's predictions or samples."""
        return self.eval / f"step-{step}.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best"

    @property
    def deploy(self) -> Path:
        """deploy/: `workbench optimize`'s artifacts and report, and the server's record and log."""
        return self.root / "deploy"

    @property
    def classical(self) -> Path:
        """classical/: the baseline fitted beside the run."""
        return self.root / "classical"

    @property
    def calibration(self) -> Path:
        """calibration.json: the temperature the run's answers are scaled by, and ECE before and after."""
        return self.root / CALIBRATION_FILE

    @property
    def trust(self) -> Path:
        """trust/: what was measured about the model's trustworthiness after training."""
        return self.root / "trust"

    @property
    def faithfulness(self) -> Path:
        return self.trust / FAITHFULNESS_FILE

    @property
    def robustness(self) -> Path:
        return self.trust / ROBUSTNESS_FILE

    @property
    def slices(self) -> Path:
        return self.trust / SLICES_FILE
