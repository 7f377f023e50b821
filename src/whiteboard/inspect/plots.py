"""Plots with matplotlib's headless backend, imported only when a plot is made."""

from __future__ import annotations

import io
from pathlib import Path

from whiteboard.files import atomic_write_bytes


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
        atomic_write_bytes(Path(path), data)
    return data


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path | None, xlabel: str, ylabel: str,
              title: str = "", logy: bool = False, reference: tuple[float, str] | None = None) -> bytes:
    """One line per series; returns the PNG bytes (and writes them when ``path`` is given)."""
    return band_plot({name: [(x, y, y, y) for x, y in points] for name, points in series.items()}, path, xlabel,
                     ylabel, title, logx=False, reference=reference, logy=logy, bands=False)


def band_plot(series: dict[str, list[tuple[float, float, float, float]]], path: Path | None, xlabel: str,
              ylabel: str, title: str = "", logx: bool = True, reference: tuple[float, str] | None = None,
              logy: bool = False, bands: bool = True) -> bytes:
    """One line per series through (x, mean, low, high) points, with the low-high band
    shaded (the spread over seeds); returns the PNG bytes (and writes them at ``path``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        line, = ax.plot(xs, [p[1] for p in points], marker="o", label=name)
        if bands:
            ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], color=line.get_color(), alpha=0.2)
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle=":", label=reference[1])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if logx or logy else "major")
    ax.legend()
    data = _save(fig, path)
    plt.close(fig)
    return data


def heatmap_panels(panels: list[tuple[str, list[list[float]], bool]], tokens: list[str], units: list[int],
                   path: Path | None, title: str = "") -> bytes:
    """Stacked tokens x units heatmaps, one panel per (name, values (units, T), is_gate)."""
    plt = _pyplot()
    height = 0.9 + 0.22 * len(units) * len(panels) + 0.4 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.16 * len(tokens) + 2), height), squeeze=False)
    for ax, (name, values, is_gate) in zip(axes[:, 0], panels):
        if is_gate:
            image = ax.imshow(values, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        else:
            bound = max(1e-6, max(abs(v) for row in values for v in row))
            image = ax.imshow(values, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_yticks(range(len(units)), [str(u) for u in units], fontsize=6)
        ax.set_xticks(range(len(tokens)), [t if t != "\n" else "\\n" for t in tokens], fontsize=6, rotation=90)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    data = _save(fig, path)
    plt.close(fig)
    return data
