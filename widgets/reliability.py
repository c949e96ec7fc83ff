"""The reliability diagram of a run's calibration record (`metrics.calibration`, `<run>/calibration.json`).

Each confidence bin's accuracy against its mean confidence, before and after temperature scaling, beside the
diagonal a calibrated model follows; and the one-line summary the Train tab shows.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

BEFORE_COLOR, AFTER_COLOR = "#9e9e9e", "#1976d2"


def calibration_text(calibration: dict[str, Any] | None, abstain_below: float | None = None) -> str:
    """"ECE 0.091 -> 0.049 (temperature 1.58)", with the threshold it abstains below; "" without a record."""
    if not calibration or "ece_before" not in calibration:
        return ""
    text = (f"ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} "
            f"(temperature {calibration.get('temperature', 1.0):.3g})")
    if abstain_below is not None:
        text += f", answers 'uncertain' below {abstain_below:g}"
    return text


def _points(bins: list[dict[str, Any]]) -> tuple[list[float], list[float], list[int]]:
    full = [b for b in bins if b.get("count")]
    return [b["confidence"] for b in full], [b["accuracy"] for b in full], [b["count"] for b in full]


def reliability_figure(calibration: dict[str, Any]) -> go.Figure:
    """Accuracy per confidence bin before and after scaling, and the diagonal (perfect calibration)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated",
                             line={"dash": "dot", "color": "#bdbdbd"}, hoverinfo="skip"))
    for key, name, color in (("bins_before", "before", BEFORE_COLOR), ("bins_after", "after", AFTER_COLOR)):
        x, y, counts = _points(calibration.get(key) or [])
        ece = calibration.get("ece_" + name)
        label = f"{name} (ECE {ece:.3f})" if isinstance(ece, (int, float)) else name
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line={"color": color},
                                 customdata=counts, marker={"size": [6 + min(c, 400) ** 0.5 for c in counts]},
                                 hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} rows"
                                               "<extra></extra>"))
    title = f"reliability on the eval split ({calibration.get('rows', 0)} rows)"
    if calibration.get("temperature") is not None:
        title += f", temperature {calibration['temperature']:.3g}"
    fig.update_layout(title=title, xaxis={"title": "confidence (top class probability)", "range": [0, 1]},
                      yaxis={"title": "accuracy", "range": [0, 1]}, height=360, margin={"t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def reliability_rows(calibration: dict[str, Any]) -> list[list[str]]:
    """Per bin with rows: the bin, its rows, accuracy and confidence before, and confidence after scaling."""
    after = {(b["lower"], b["upper"]): b for b in calibration.get("bins_after") or []}
    out = []
    for b in calibration.get("bins_before") or []:
        scaled = after.get((b["lower"], b["upper"])) or {}
        if not b.get("count") and not scaled.get("count"):
            continue
        out.append([f"{b['lower']:.1f}-{b['upper']:.1f}", f"{b['count']} / {scaled.get('count', 0)}",
                     _fmt(b.get("accuracy")), _fmt(b.get("confidence")), _fmt(scaled.get("accuracy")),
                     _fmt(scaled.get("confidence"))])
    return out


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else ""
