"""The confusion heatmap that ConfusionMatrix (labels) and EntitiesView (entity types) both draw."""

from __future__ import annotations

import json
from typing import Any

import plotly.graph_objects as go

from workbench.run_paths import RunPaths

from . import _style as S
from ._figure import LiveFigure


def confusion_figure(height: int, predicted: str = "predicted", true: str = "true") -> LiveFigure:
    """A heatmap of counts (rows: the true label, top to bottom; columns: the predicted one), each cell
    written out; a LiveFigure, so a page opened at any time shows the matrix as it is now."""
    return LiveFigure(
        data=[go.Heatmap(z=[], x=[], y=[], colorscale="Blues", showscale=False, texttemplate="%{text}",
                         hovertemplate=f"{true} %{{y}}<br>{predicted} %{{x}}<br>%{{text}}<extra></extra>")],
        layout=S.figure_layout(height=height, margin={"l": 90, "r": 10, "t": 30, "b": 80},
                               xaxis={"title": {"text": predicted}, "side": "bottom", "type": "category",
                                      "gridcolor": "rgba(0,0,0,0)"},
                               yaxis={"title": {"text": true}, "autorange": "reversed", "type": "category",
                                      "gridcolor": "rgba(0,0,0,0)"}))


def heatmap_cells(counts: list[list[int]], normalize: bool) -> tuple[list[list[Any]], list[list[str]]]:
    """The heatmap's colours and cell words: counts, or shares of each row (with the count beside)."""
    if normalize:
        z = [[v / max(sum(row), 1) for v in row] for row in counts]
        return z, [[f"{v / max(sum(row), 1):.2f}<br>({v})" for v in row] for row in counts]
    return [list(row) for row in counts], [[str(v) for v in row] for row in counts]


LATEST = -1  # step selector value meaning "the newest evaluation"


class EvalStepView:
    """What the views of one run's evaluations share (ConfusionMatrix, EntitiesView): an evaluation's saved
    rows (<run>/eval/step-N.json, cached), the step selector, and a click on a heatmap cell. The view has
    `store`, `run_id`, `step`, `error`, `_evals`, `_rows_cache` and `select_cell(true, predicted)`."""

    def _rows(self, step: int) -> list[dict[str, Any]]:
        key = (self.run_id, int(step))
        if key not in self._rows_cache:
            path = RunPaths(self.store.run_dir(self.run_id)).eval_step(int(step))
            try:
                rows = json.loads(path.read_text(encoding="utf-8")).get("rows", [])
            except (OSError, ValueError) as exc:
                self.error = f"no predictions saved for step {step} ({type(exc).__name__})"
                return []
            self._rows_cache[key] = [r for r in rows if isinstance(r, dict)]
        return self._rows_cache[key]

    def _on_step_pick(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if value == LATEST:
            self.step = None
        elif isinstance(value, int) and value in self._evals:
            self.step = value

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        xs, ys = list(getattr(points, "xs", []) or []), list(getattr(points, "ys", []) or [])
        if xs and ys and isinstance(xs[0], str) and isinstance(ys[0], str):
            self.select_cell(ys[0], xs[0])
