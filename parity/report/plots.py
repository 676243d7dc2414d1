"""PNG plots of comparison results (matplotlib, Agg: no display needed).

Error axes are logarithmic: errors span orders of magnitude between the
first layers and the last, and an entry point shows as a step.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from parity.errors import ParityError

_STATUS_COLOR = {"pass": "#2a9d8f", "warn": "#e9c46a", "fail": "#e76f51"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _outdir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ParityError(f"cannot create plot folder {path}: {exc}") from None
    return path


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def error_curve(curve: pd.DataFrame, path: str, title: str = "error by layer") -> str:
    """Per-layer error (``layer``, ``err``, optional ``verdict`` and ``growth``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    x = [int(v) for v in curve["layer"]]
    y = [max(_num(v), 1e-30) if not math.isnan(_num(v)) else math.nan for v in curve["err"]]
    ax.plot(x, y, "-", color="#264653", lw=1)
    colors = [_STATUS_COLOR.get(v, "#888") for v in curve.get("verdict", ["pass"] * len(x))]
    ax.scatter(x, y, c=colors, s=18, zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("rel_l2 (worst over sequences)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if "growth" in curve and len(x) > 1:
        ax2 = ax.twinx()
        ax2.plot(x, [_num(g) for g in curve["growth"]], ":", color="#888", lw=1)
        ax2.set_ylabel("growth err L / err L-1", color="#888")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(pivot: pd.DataFrame, path: str, title: str, xlabel: str, ylabel: str, log: bool = True) -> str:
    plt = _plt()
    import numpy as np

    data = pivot.to_numpy(dtype=float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.log10(np.where(data > 0, data, np.nan))
    h = max(3.0, 0.28 * len(pivot.index) + 1.5)
    # Leave room for long stage names on the y axis and the colour bar.
    longest = max((len(str(i)) for i in pivot.index), default=10)
    w = max(7.0, 0.3 * len(pivot.columns) + 0.06 * longest + 3.0)
    fig, ax = plt.subplots(figsize=(min(w, 30), min(h, 30)))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_xticks(range(len(pivot.columns)))
    ax.set_xticklabels([str(c) for c in pivot.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(pivot.index)))
    ax.set_yticklabels([str(i) for i in pivot.index], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="log10 " + ("error" if log else "value"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _is_layer(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def compare_plots(table: pd.DataFrame, curve: pd.DataFrame | None, out_dir: str) -> list[str]:
    """Per-layer error curve and layer x stage heatmap of a compare table."""
    out_dir = _outdir(out_dir)
    paths = []
    t = table[table["layer"].map(_is_layer)].copy()
    t["layer"] = t["layer"].astype(int)
    t["rel_l2"] = pd.to_numeric(t["rel_l2"], errors="coerce")
    t = t.dropna(subset=["rel_l2"])
    if curve is not None and len(curve):
        paths.append(error_curve(curve, os.path.join(out_dir, "error_by_layer.png")))
    elif len(t):
        c = t.groupby("layer", sort=True)["rel_l2"].max().reset_index().rename(columns={"rel_l2": "err"})
        paths.append(error_curve(c, os.path.join(out_dir, "error_by_layer.png")))
    if len(t):
        order = list(dict.fromkeys(t["stage"]))
        pivot = t.pivot_table(index="stage", columns="layer", values="rel_l2", aggfunc="max").reindex(order)
        paths.append(heatmap(pivot, os.path.join(out_dir, "layer_stage_heatmap.png"),
                             "rel_l2 by layer and stage (worst over sequences)", "layer", "stage"))
    return paths


def slot_plots(table: pd.DataFrame, out_dir: str) -> list[str]:
    """Slot x layer heatmap of the non-equal fraction (0 = bitwise invariant)."""
    out_dir = _outdir(out_dir)
    t = table[table["layer"].map(_is_layer)].copy()
    t["layer"] = t["layer"].astype(int)
    if not len(t):
        return []
    t["differ"] = 1.0 - pd.to_numeric(t["frac_equal"], errors="coerce").fillna(0.0)
    pivot = t.pivot_table(index="slot", columns="layer", values="differ", aggfunc="max")
    return [heatmap(pivot, os.path.join(out_dir, "slot_layer_heatmap.png"),
                    "fraction of elements not bitwise equal (blank: invariant)", "layer", "slot")]
