"""Tables and plots of evaluation metrics against step budget or training step.

Results are keyed by the sampling step budget (1, 2, 4, ..., 128). A value is
either a float or a dict of floats; dicts are expected to carry a ``'mean'``
entry (or ``'value'``) and optionally ``'std'`` -- the usual "over seeds"
summary -- and any further entries are reported as their own columns.

Plots are drawn on an explicit Agg canvas rather than through ``pyplot`` so
they never depend on, or change, the process-wide matplotlib backend (training
scripts call these from headless workers and sometimes from threads).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

__all__ = ["write_budget_table", "plot_budget_curve", "plot_metric_vs_training"]

_PRIMARY_KEYS = ("mean", "value")


def _to_float(v) -> float:
    # Accepts numpy / jax scalars and 0-d arrays as well as Python numbers.
    return float(v)


def _split_value(value) -> tuple[float, float | None, dict[str, float]]:
    """(primary value, std or None, other named entries) of one result cell."""
    if isinstance(value, Mapping):
        primary_key = next((k for k in _PRIMARY_KEYS if k in value), None)
        if primary_key is None:
            raise ValueError(f"dict results need a 'mean' or 'value' entry, got keys {sorted(value)}")
        std = _to_float(value["std"]) if "std" in value else None
        others = {str(k): _to_float(v) for k, v in value.items() if k not in (primary_key, "std")}
        return _to_float(value[primary_key]), std, others
    return _to_float(value), None, {}


def _sorted_budgets(results: Mapping) -> list[tuple[int, object]]:
    # Keys may come back as strings after a JSON round trip.
    return sorted(((int(k), v) for k, v in results.items()), key=lambda kv: kv[0])


def _fmt(v: float | None, precision: int) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{precision}g}"


def _json_safe(v):
    # Strict JSON has no NaN/Infinity; null keeps the file loadable everywhere.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def write_budget_table(
    results: Mapping[int, float | Mapping[str, float]],
    path_prefix: str | os.PathLike,
    *,
    metric_name: str,
    floor: float | None = None,
    extra_columns: Mapping[str, Mapping[int, float]] | None = None,
    precision: int = 4,
) -> str:
    """Write ``<prefix>.md``, ``<prefix>.json`` and ``<prefix>.csv``; return the markdown.

    Markdown columns: ``steps | <metric_name> [| ratio to floor] [| extra ...]``.
    A dict value with ``mean``/``std`` is shown as ``mean ± std``; its other
    entries become columns named ``<metric_name> <key>``. ``extra_columns`` maps a
    column name to ``{steps: value}`` (missing budgets are left blank). The ratio
    to the floor is ``value / floor`` (blank when the floor is not positive).

    The JSON holds ``metric_name``, ``floor`` and ``rows``: one flat dict per
    budget with the same keys as the CSV header (``steps``, ``<metric_name>`` or
    ``<metric_name>_mean``/``_std``, ``ratio_to_floor``, extras).
    """
    prefix = os.fspath(path_prefix)
    extra_columns = {str(k): {int(s): v for s, v in col.items()} for k, col in (extra_columns or {}).items()}
    budgets = _sorted_budgets(results)
    if not budgets:
        raise ValueError("results is empty")
    floor_f = None if floor is None else _to_float(floor)
    ratio_ok = floor_f is not None and math.isfinite(floor_f) and floor_f > 0

    parsed = [(steps, *_split_value(v)) for steps, v in budgets]
    has_std = any(std is not None for _, _, std, _ in parsed)
    uses_mean = any(isinstance(v, Mapping) and "mean" in v for _, v in budgets)
    other_keys: list[str] = []
    for _, _, _, others in parsed:
        other_keys += [k for k in others if k not in other_keys]

    primary_col = f"{metric_name}_mean" if uses_mean else metric_name
    rows = []
    for steps, value, std, others in parsed:
        row: dict[str, object] = {"steps": steps, primary_col: value}
        if has_std:
            row[f"{metric_name}_std"] = std
        for k in other_keys:
            row[f"{metric_name}_{k}"] = others.get(k)
        if floor_f is not None:
            row["ratio_to_floor"] = value / floor_f if ratio_ok else None
        for name, col in extra_columns.items():
            row[name] = _to_float(col[steps]) if steps in col else None
        rows.append(row)

    # Markdown.
    header = ["steps", metric_name]
    header += [f"{metric_name} {k}" for k in other_keys]
    if floor_f is not None:
        header.append("ratio to floor")
    header += list(extra_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for (steps, value, std, others), row in zip(parsed, rows):
        cell = _fmt(value, precision)
        if std is not None:
            cell += f" ± {_fmt(std, precision)}"
        cells = [str(steps), cell]
        cells += [_fmt(others.get(k), precision) for k in other_keys]
        if floor_f is not None:
            r = row["ratio_to_floor"]
            cells.append("" if r is None else f"{r:.3g}x")
        cells += [_fmt(row[name], precision) for name in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    if floor_f is not None:
        lines += ["", f"Floor (data vs data) for {metric_name}: {_fmt(floor_f, precision)}"]
    markdown = "\n".join(lines) + "\n"

    _ensure_parent(prefix + ".md")
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(markdown)

    payload = {
        "metric_name": metric_name,
        "floor": _json_safe(floor_f),
        "rows": [{k: _json_safe(v) for k, v in row.items()} for row in rows],
    }
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")

    fieldnames = list(rows[0])
    with open(prefix + ".csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            # repr keeps full float precision in the CSV; None becomes an empty cell.
            writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return markdown


def _new_axes(figsize=(6.0, 4.0)):
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    _ensure_parent(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_budget_curve(
    curves: Mapping[str, Mapping[int, float | Mapping[str, float]]],
    path: str | os.PathLike,
    *,
    metric_name: str,
    floor: float | None = None,
    title: str | None = None,
    stds: Mapping[str, Mapping[int, float]] | None = None,
    log_y: bool = False,
) -> str:
    """Metric against step budget (log2 x axis), one line per curve; PNG at ``path``.

    Curve values may be floats or ``{'mean', 'std'}`` dicts as in
    :func:`write_budget_table`; explicit ``stds`` take precedence and are drawn
    as error bars. ``floor`` adds a dashed horizontal reference line.
    """
    fig, ax = _new_axes()
    all_budgets: set[int] = set()
    for name, curve in curves.items():
        pts = [(s, *_split_value(v)[:2]) for s, v in _sorted_budgets(curve)]
        if not pts:
            continue
        xs = [s for s, _, _ in pts]
        ys = [v for _, v, _ in pts]
        if stds is not None and name in stds:
            given = {int(k): _to_float(v) for k, v in stds[name].items()}
            errs = [given.get(s, 0.0) for s in xs]
        elif any(sd is not None for _, _, sd in pts):
            errs = [0.0 if sd is None else sd for _, _, sd in pts]
        else:
            errs = None
        all_budgets.update(xs)
        ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=4, capsize=3, label=str(name))
    if floor is not None:
        ax.axhline(_to_float(floor), color="gray", linestyle="--", linewidth=1.2, label="data floor")
    ax.set_xscale("log", base=2)
    if all_budgets:
        ticks = sorted(all_budgets)
        # Step budgets are integers; show them as such instead of 2^k.
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric_name)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves or floor is not None:
        ax.legend()
    return _save(fig, path)


def plot_metric_vs_training(
    curves: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike,
    *,
    metric_name: str,
    x_label: str = "training step",
    floor: float | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> str:
    """Metric against training step (linear x axis), one line per curve; PNG at ``path``."""
    fig, ax = _new_axes()
    for name, curve in curves.items():
        pts = _sorted_budgets(curve)
        ax.plot([s for s, _ in pts], [_split_value(v)[0] for _, v in pts], marker="o", markersize=3, label=str(name))
    if floor is not None:
        ax.axhline(_to_float(floor), color="gray", linestyle="--", linewidth=1.2, label="data floor")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric_name)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves or floor is not None:
        ax.legend()
    return _save(fig, path)
