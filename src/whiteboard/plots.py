"""Plots with matplotlib's headless backend, imported only when a plot is made."""

from __future__ import annotations

import io
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and no window ever opens
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path | None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(path), data)
    return data


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path | None, xlabel: str, ylabel: str,
              title: str = "", logy: bool = False, reference: tuple[float, str] | None = None) -> bytes:
    """One line per series; returns the PNG bytes (and writes them when ``path`` is given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle=":", label=reference[1])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    data = _save(fig, path)
    plt.close(fig)
    return data
