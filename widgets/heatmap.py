"""The confusion heatmap that ConfusionMatrix (labels) and EntitiesView (entity types) both draw."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

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
