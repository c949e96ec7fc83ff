"""Shared layout and inline-message helpers: full-width, wrapping, theme-neutral.

Nothing here hard-codes a background colour: text and borders use JupyterLab's
CSS variables (with fallbacks for classic Notebook and Voila), and plotly
figures get transparent backgrounds and a mid-grey font that reads on light
and dark themes alike.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

ERROR_COLOR = "var(--jp-error-color1, #d32f2f)"
MUTED_COLOR = "var(--jp-ui-font-color2, #757575)"
ACCENT_COLOR = "var(--jp-brand-color1, #1976d2)"
BORDER = "1px solid var(--jp-border-color2, rgba(128, 128, 128, 0.35))"
FONT_GREY = "#808080"  # plotly needs a literal colour; mid grey reads on both themes
GRID_GREY = "rgba(128, 128, 128, 0.25)"
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
LABEL_WIDTH = "9em"


def full_width(**extra: Any) -> W.Layout:
    """A layout that takes the row and may shrink below its content width.

    Widgets carry a margin (--jp-widgets-margin, 2px a side) outside their width: 100% would overflow the
    parent box by that much, and the box would show a horizontal scrollbar for it.
    """
    width = "100%" if "margin" in extra else "calc(100% - 2 * var(--jp-widgets-margin, 2px))"
    return W.Layout(width=width, min_width="0", **extra)


def wrap_row(**extra: Any) -> W.Layout:
    """A flex row whose children wrap onto new lines at narrow widths."""
    return W.Layout(width="100%", display="flex", flex_flow="row wrap", align_items="flex-start",
                    grid_gap="4px 12px", **extra)


def control_layout() -> W.Layout:
    """For a single form control inside a wrap_row: grows, but wraps below 16em."""
    return W.Layout(flex="1 1 16em", min_width="12em", max_width="32em")


def label_style() -> dict[str, str]:
    return {"description_width": LABEL_WIDTH}


def message(text: str, kind: str = "error") -> str:
    """Inline words (never a traceback) for an HTML widget; empty text gives empty HTML."""
    if not text:
        return ""
    color = {"error": ERROR_COLOR, "muted": MUTED_COLOR, "ok": ACCENT_COLOR}.get(kind, MUTED_COLOR)
    icon = "&#9888; " if kind == "error" else ""
    return f'<div style="color:{color}; white-space:normal; overflow-wrap:anywhere">{icon}{html.escape(text)}</div>'


def inline_error() -> W.HTML:
    """An empty HTML widget that shows one message under a field."""
    return W.HTML("", layout=full_width())


def section(title: str) -> W.HTML:
    return W.HTML(f'<b style="font-size:1.05em">{html.escape(title)}</b>', layout=full_width(margin="8px 0 2px 0"))


def table_html(header: list[str], rows: list[list[Any]], max_height: str = "20em", nowrap: bool = False) -> str:
    """A small table in its own scroll box; every cell is escaped, colours come from the theme.

    The header stays in view while the rows scroll, and the box has a border so that a cut row reads as
    "scroll for more" rather than as one widget drawn over another. `nowrap` keeps each cell on one line
    (the box then scrolls sideways instead of wrapping ids into three lines).
    """
    wrap = "white-space:nowrap; " if nowrap else ""
    th = "".join(f'<th style="text-align:left; padding:2px 8px; border-bottom:{BORDER}; {wrap}position:sticky; '
                 f'top:0; background:var(--jp-layout-color1, #fff)">{html.escape(str(h))}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="padding:2px 8px; vertical-align:top; {wrap}border-bottom:{BORDER}">'
                         f"{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    # width 0 + min-width 100%: the box fills its row but never widens it (a wide table scrolls inside)
    return (f'<div style="max-height:{max_height}; overflow:auto; width:0; min-width:100%; box-sizing:border-box; '
            f'border:{BORDER}; line-height:1.5">'
            f'<table style="border-collapse:collapse; font-size:0.9em; min-width:100%">'
            f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>")


def bars_html(counts: dict[str, float], total: float | None = None, fmt: str = "{:,}") -> str:
    """A horizontal bar chart in plain HTML (theme colours, any width)."""
    if not counts:
        return ""
    top = max(counts.values()) or 1
    total = total if total is not None else None
    rows = []
    for name, value in counts.items():
        pct = 100.0 * value / top
        share = f" ({100.0 * value / total:.0f}%)" if total else ""
        rows.append(
            f'<div style="display:flex; align-items:center; gap:6px; margin:1px 0">'
            f'<span style="flex:0 0 9em; overflow:hidden; text-overflow:ellipsis; white-space:nowrap" '
            f'title="{html.escape(name)}">{html.escape(name)}</span>'
            f'<span style="flex:1 1 auto; min-width:2em"><span style="display:block; height:0.9em; '
            f'width:{pct:.1f}%; background:{ACCENT_COLOR}; opacity:0.8"></span></span>'
            f'<span style="flex:0 0 auto; color:{MUTED_COLOR}">{fmt.format(value)}{share}</span></div>'
        )
    return '<div style="width:100%">' + "".join(rows) + "</div>"


def figure_layout(**extra: Any) -> dict[str, Any]:
    """Plotly layout defaults: transparent backgrounds, grey text and grid, compact margins."""
    axis = {"gridcolor": GRID_GREY, "zerolinecolor": GRID_GREY, "linecolor": GRID_GREY}
    base: dict[str, Any] = {
        "template": "none",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"color": FONT_GREY, "size": 12},
        "margin": {"l": 50, "r": 50, "t": 30, "b": 40},
        "autosize": True,
        "height": 360,
        "xaxis": dict(axis),
        "yaxis": dict(axis),
        "legend": {"orientation": "h", "y": -0.2, "bgcolor": "rgba(0,0,0,0)"},
        "hoverlabel": {"namelength": -1},
    }
    base.update(extra)
    return base


def human_count(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float | None) -> str:
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
