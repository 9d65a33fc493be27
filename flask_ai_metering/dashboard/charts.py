"""Plotly figures for the dashboard, built with ``plotly.graph_objects``.

Never ``plotly.express``: it needs numpy (and pandas to be useful). Figures are
serialized to JSON and embedded in ``<script type="application/json">``; one
static script calls ``Plotly.newPlot`` on them, so pages work under a strict
``script-src 'self'`` CSP. Chart values are floats: they only draw bars, the
exact amounts are in the tables beside them.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t

from ..money import from_units
from . import outlook
from .pages import CHART_SERIES
from .pages import TOP_N
from .pages import Summary
from .pages import ranked

#: A calm palette that stays readable for common colour-vision deficiencies.
COLORS = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
_FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12, "color": "#334155"}


def _layout(**extra: t.Any) -> dict[str, t.Any]:
    layout: dict[str, t.Any] = {
        "font": _FONT,
        "margin": {"l": 48, "r": 12, "t": 8, "b": 36},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "height": 300,
        "legend": {"orientation": "h", "y": -0.18, "x": 0},
        "hovermode": "x unified",
        "colorway": COLORS,
        "xaxis": {"gridcolor": "#e2e8f0", "automargin": True},
        "yaxis": {"gridcolor": "#e2e8f0", "automargin": True, "rangemode": "tozero"},
    }
    layout.update(extra)
    return layout


def plotly_text(name: str | None) -> str:
    """A stored name (model, provider, feature, billable) as text Plotly shows literally.

    Plotly reads a subset of HTML in trace names, tick labels, hover text and
    annotations (``<a href>``, ``<span style>``, ``<b>``, ``<br>``), so a model named
    ``<a href=…>`` would become a live link in the chart. With ``&``, ``<`` and ``>``
    as entities Plotly draws the characters themselves. Every name that reaches a
    figure goes through here; ``''`` (none) reads "(none)".
    """
    if not name:
        return "(none)"
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_json(figure: t.Any) -> str:
    """The figure as JSON that is safe inside a ``<script>`` element (no ``<``, ``>`` or ``&``)."""
    text = figure.to_json()
    return str(text).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def days_of(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]


def cost_over_time(summary: Summary, start: dt.date, end: dt.date, group: str) -> str:
    """Daily cost stacked by model or provider (the top groups; the rest as "Other")."""
    import plotly.graph_objects as go

    ranking = summary.ranking(group)
    cells = summary.by_day_group
    names = [name for name, _ in ranking.shown(CHART_SERIES)]
    days = days_of(start, end)
    x = [d.isoformat() for d in days]
    figure = go.Figure(layout=_layout(barmode="stack", yaxis={"gridcolor": "#e2e8f0", "tickprefix": "$"}))
    series = [(plotly_text(name), [cells.get((d, name), 0) for d in days]) for name in names]
    if ranking.rest(CHART_SERIES) is not None:
        # The day's cost less the named series: what the groups not named spent.
        day_cost = [summary.by_day[d].cost_units if d in summary.by_day else 0 for d in days]
        series.append(("Other", [total - sum(ys[i] for _, ys in series) for i, total in enumerate(day_cost)]))
    for name, ys in series:
        figure.add_trace(go.Bar(x=x, y=[float(from_units(u)) for u in ys], name=name, hovertemplate="$%{y:.4f}"))
    return to_json(figure)


def error_rate_per_day(health: outlook.Health, start: dt.date, end: dt.date) -> str:
    """Failed ÷ (recorded + failed) per day of the range's last days, a line per model (the errors table's)."""
    import plotly.graph_objects as go

    days = days_of(max(start, end - dt.timedelta(days=outlook.LATENCY_DAYS - 1)), end)
    x = [d.isoformat() for d in days]
    figure = go.Figure(layout=_layout(yaxis={"title": {"text": "%"}, "gridcolor": "#e2e8f0", "rangemode": "tozero"}))
    for row in health.by_model:
        ys = [health.error_rate(d, row.model) for d in days]
        if any(y for y in ys):
            figure.add_trace(
                go.Scatter(x=x, y=ys, name=plotly_text(row.model), mode="lines+markers", hovertemplate="%{y:.2f}%")
            )
    if not figure.data:
        figure.add_trace(go.Scatter(x=x, y=[0 for _ in days], name="No failures", mode="lines"))
    return to_json(figure)


def latency_per_day(health: outlook.Health, start: dt.date, end: dt.date) -> str:
    """p50 (solid) and p95 (dotted) provider-call latency per day of the range's last days, per model."""
    import plotly.graph_objects as go

    days = days_of(max(start, end - dt.timedelta(days=outlook.LATENCY_DAYS - 1)), end)
    x = [d.isoformat() for d in days]
    figure = go.Figure(layout=_layout(yaxis={"title": {"text": "ms"}, "gridcolor": "#e2e8f0", "rangemode": "tozero"}))
    for row in health.by_model:
        if not row.latency:
            continue
        name = plotly_text(row.model)
        for q, dash in ((0.5, "solid"), (0.95, "dot")):
            ys = [outlook.percentile(health.latency_by_day.get((d, row.model), {}), q) for d in days]
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=ys,
                    name=f"{name} p{int(q * 100)}",
                    mode="lines+markers",
                    line={"dash": dash},
                    connectgaps=False,
                    hovertemplate="%{y:,.0f} ms",
                )
            )
    if not figure.data:
        figure.add_trace(go.Scatter(x=x, y=[None for _ in days], name="No metered durations", mode="lines"))
    return to_json(figure)


def calls_and_tokens(summary: Summary, start: dt.date, end: dt.date) -> str:
    """Tokens (bars) and calls (line, right axis) per day."""
    import plotly.graph_objects as go

    days = days_of(start, end)
    x = [d.isoformat() for d in days]
    empty = summary.by_day.get
    figure = go.Figure(
        layout=_layout(
            yaxis={"title": {"text": "tokens"}, "gridcolor": "#e2e8f0", "rangemode": "tozero"},
            yaxis2={
                "title": {"text": "calls"},
                "overlaying": "y",
                "side": "right",
                "rangemode": "tozero",
                "showgrid": False,
            },
        )
    )
    figure.add_trace(
        go.Bar(
            x=x,
            y=[t_.total_tokens if (t_ := empty(d)) else 0 for d in days],
            name="Tokens",
            marker={"color": "#a5b4fc"},
        )
    )
    figure.add_trace(
        go.Scatter(
            x=x,
            y=[t_.calls if (t_ := empty(d)) else 0 for d in days],
            name="Calls",
            yaxis="y2",
            mode="lines+markers",
            line={"color": "#4338ca"},
        )
    )
    return to_json(figure)


def token_types(summary: Summary) -> str:
    """Where the tokens went: uncached input, cache reads and writes, output and reasoning."""
    import plotly.graph_objects as go

    totals = summary.totals
    labels = ["Input (uncached)", "Cached input", "Cache write", "Output", "Reasoning"]
    values = [
        max(totals.input_tokens - totals.cached_input_tokens - totals.cache_write_tokens, 0),
        totals.cached_input_tokens,
        totals.cache_write_tokens,
        max(totals.output_tokens - totals.reasoning_tokens, 0),
        totals.reasoning_tokens,
    ]
    figure = go.Figure(
        go.Bar(x=values, y=labels, orientation="h", marker={"color": COLORS[:5]}, hovertemplate="%{x:,} tokens"),
        layout=_layout(
            hovermode="closest",
            yaxis={"autorange": "reversed", "automargin": True},
            xaxis={"gridcolor": "#e2e8f0"},
            showlegend=False,
            height=240,
        ),
    )
    return to_json(figure)


def cost_by(summary: Summary, group: str) -> str:
    """Cost per model (or provider, feature) as a horizontal bar chart."""
    import plotly.graph_objects as go

    items = ranked(summary.ranking(group), limit=TOP_N)
    figure = go.Figure(
        go.Bar(
            x=[float(from_units(totals.cost_units)) for _, totals in items],
            y=[plotly_text(name) for name, _ in items],
            orientation="h",
            marker={"color": COLORS[0]},
            hovertemplate="$%{x:.4f}<extra></extra>",
        ),
        layout=_layout(
            hovermode="closest",
            yaxis={"autorange": "reversed", "automargin": True},
            xaxis={"gridcolor": "#e2e8f0", "tickprefix": "$"},
            showlegend=False,
            height=max(160, 40 + 28 * len(items)),
        ),
    )
    return to_json(figure)


def charts_are_valid(payload: str) -> bool:
    """True when ``payload`` parses as a figure with data (used by tests and the bench)."""
    figure = json.loads(payload)
    return bool(figure.get("data"))
