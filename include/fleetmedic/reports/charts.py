"""PNG charts of a trend report (matplotlib, Agg backend): incidents per day by type, MTTR trend, automation rate."""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib.dates as mdates
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fleetmedic.reports.trends import ALL, TrendReport

__all__ = ["CHARTS", "render_charts"]

# name -> title; the order is the order on the page.
CHARTS: dict[str, str] = {
    "incidents_per_day": "Incidents per day by type",
    "mttr_trend": "Time to resolve per day (median, minutes)",
    "automation_rate": "Automation rate per day",
}

_SIZE = (9.0, 3.6)
_DPI = 100


def _figure() -> tuple[Figure, Axes]:
    # The object-oriented API with an Agg canvas: no pyplot global state, safe in threads and workers.
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this period", ha="center", va="center",
            transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _days_axis(fig: Figure, ax: Axes, report: TrendReport) -> None:
    """The x axis spans the period's days (half a day of margin each side), labelled by day, whatever
    the data: a one-day period must not autoscale to years, nor a month to hours."""
    first = pd.Timestamp(report.period.start.date())
    last = pd.Timestamp((report.period.end - pd.Timedelta(microseconds=1)).date())
    ax.set_xlim(first - pd.Timedelta(hours=12), last + pd.Timedelta(hours=12))
    days = (last - first).days + 1
    ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, days // 10)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
    fig.autofmt_xdate()


def _daily(report: TrendReport) -> pd.DataFrame:
    df = report.tables.get("daily")
    if df is None or df.empty:
        return pd.DataFrame(columns=["day", "type", "incidents", "auto_resolved", "escalated", "resolved",
                                     "mttr_p50_s"])
    out = df.copy()
    out["day"] = pd.to_datetime(out["day"])
    return out


def incidents_per_day(report: TrendReport) -> bytes:
    fig, ax = _figure()
    df = _daily(report)
    per_type = df[df["type"] != ALL]
    if per_type.empty or int(per_type["incidents"].sum()) == 0:
        _no_data(ax, "incidents")
    else:
        pivot = per_type.pivot_table(index="day", columns="type", values="incidents", aggfunc="sum", fill_value=0)
        pivot = pivot[pivot.sum().sort_values(ascending=False).index]
        bottom = pd.Series(0, index=pivot.index, dtype="float64")
        width = 0.8
        for t in pivot.columns:
            ax.bar(pivot.index, pivot[t], bottom=bottom, label=t, width=width)
            bottom += pivot[t]
        ax.set_ylabel("incidents")
        ax.set_ylim(0, float(bottom.max()) * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=7, ncols=min(4, len(pivot.columns)), loc="upper left")
        _days_axis(fig, ax, report)
    ax.set_title(CHARTS["incidents_per_day"])
    return _png(fig)


def mttr_trend(report: TrendReport) -> bytes:
    fig, ax = _figure()
    df = _daily(report)
    overall = df[(df["type"] == ALL)].dropna(subset=["mttr_p50_s"])
    if overall.empty:
        _no_data(ax, "resolved incidents")
    else:
        ax.plot(overall["day"], overall["mttr_p50_s"] / 60.0, marker="o", markersize=3,
                label="all types")
        per_type = df[(df["type"] != ALL)].dropna(subset=["mttr_p50_s"])
        top = per_type.groupby("type")["resolved"].sum().sort_values(ascending=False).head(3).index
        for t in top:
            series = per_type[per_type["type"] == t]
            ax.plot(series["day"], series["mttr_p50_s"] / 60.0, linewidth=1, alpha=0.7,
                    label=t)
        ax.set_ylabel("minutes")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left")
        _days_axis(fig, ax, report)
    ax.set_title(CHARTS["mttr_trend"])
    return _png(fig)


def automation_rate(report: TrendReport) -> bytes:
    fig, ax = _figure()
    df = _daily(report)
    overall = df[(df["type"] == ALL) & (df["incidents"] > 0)]
    if overall.empty:
        _no_data(ax, "incidents")
    else:
        auto = 100.0 * overall["auto_resolved"] / overall["incidents"]
        escalated = 100.0 * overall["escalated"] / overall["incidents"]
        ax.plot(overall["day"], auto, marker="o", markersize=3, color="#2a9d3f",
                label="resolved by automation")
        ax.plot(overall["day"], escalated, marker="o", markersize=3, color="#d1495b",
                label="escalated to a human")
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of incidents opened that day")
        ax.legend(fontsize=7, loc="center left")
        _days_axis(fig, ax, report)
    ax.set_title(CHARTS["automation_rate"])
    return _png(fig)


_RENDERERS: dict[str, Callable[[TrendReport], bytes]] = {
    "incidents_per_day": incidents_per_day,
    "mttr_trend": mttr_trend,
    "automation_rate": automation_rate,
}


def render_charts(report: TrendReport) -> dict[str, tuple[str, bytes]]:
    """Every chart of the report: name -> (title, PNG bytes). An empty period gives 'no data' charts."""
    return {name: (CHARTS[name], _RENDERERS[name](report)) for name in CHARTS}
