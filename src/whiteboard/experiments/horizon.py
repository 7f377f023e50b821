"""A model's memory horizon: how far back a clue can lie before the model loses it.

The horizon is the distance at which accuracy falls to half of the model's accuracy at
short distances, read off an accuracy-by-distance curve measured on a log-spaced grid and
interpolated linearly in log distance between the two grid points that straddle the half
mark. A curve that never falls that low within the grid has a horizon beyond its largest
distance (``math.inf``: censored). Over seeds, horizons are summarised on the log scale
(they are scale quantities): the geometric mean with a 95 % t-interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Distances up to this many tokens count as "short": the accuracy the horizon halves.
SHORT_DISTANCE = 10
#: Student's t at 97.5 % for 1..9 degrees of freedom (the 95 % two-sided interval).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def log_grid(low: int, high: int, points: int) -> list[int]:
    """``points`` distances from ``low`` to ``high``, evenly spaced in log distance (rounded,
    duplicates dropped)."""
    if points < 2 or low < 1 or high <= low:
        raise ValueError(f"need low >= 1, high > low and 2 or more points, got {low}, {high}, {points}")
    ratio = (high / low) ** (1 / (points - 1))
    return sorted({round(low * ratio ** i) for i in range(points)})


def short_accuracy(curve: dict[int, float], short: int = SHORT_DISTANCE) -> float:
    """Mean accuracy at the distances up to ``short`` (at the shortest one if none is)."""
    near = [acc for d, acc in curve.items() if d <= short] or [curve[min(curve)]]
    return sum(near) / len(near)


def horizon(curve: dict[int, float], short: int = SHORT_DISTANCE, floor: float = 0.0) -> float:
    """The distance at which ``curve`` (distance -> accuracy) first falls to half of its
    short-distance accuracy; ``math.inf`` where it stays above that on the whole grid;
    ``math.nan`` where the short-distance accuracy is no higher than ``floor`` (twice chance,
    say): a model that never learned the task has no horizon."""
    if short_accuracy(curve, short) <= floor:
        return math.nan
    half = short_accuracy(curve, short) / 2
    points = sorted(curve.items())
    if points[0][1] <= half:
        return float(points[0][0])
    for (d0, a0), (d1, a1) in zip(points, points[1:]):
        if a1 <= half:
            share = (a0 - half) / (a0 - a1)
            return math.exp(math.log(d0) + share * (math.log(d1) - math.log(d0)))
    return math.inf


@dataclass
class HorizonSummary:
    horizons: list[float]  # one per seed (nan: that seed never learned the task)
    mean: float  # geometric mean over the seeds that learned (inf if any is censored)
    low: float  # 95 % interval on the log scale (nan with one seed)
    high: float
    beyond: int | None  # the grid's largest distance, where a seed's horizon lies beyond it
    not_learned: int = 0  # seeds without a horizon

    def text(self) -> str:
        if self.not_learned:
            learned = len(self.horizons) - self.not_learned
            if not learned:
                return "not learned"
            rest = HorizonSummary([h for h in self.horizons if not math.isnan(h)], self.mean, self.low, self.high,
                                  self.beyond).text()
            return f"{rest} ({self.not_learned} of {len(self.horizons)} seeds did not learn the task)"
        if self.beyond is not None:
            return f"> {self.beyond}"
        if math.isnan(self.low):
            return f"{self.mean:.0f}"
        return f"{self.mean:.0f} (95 % CI {self.low:.0f}-{self.high:.0f})"


def summarize(horizons: list[float], largest_distance: int) -> HorizonSummary:
    """Horizons of several seeds: geometric mean and 95 % t-interval of the log horizons.
    One censored seed makes the summary a lower bound, the grid's largest distance."""
    if not horizons:
        raise ValueError("no horizons to summarise")
    learned = [h for h in horizons if not math.isnan(h)]
    if len(learned) < len(horizons):
        if not learned:
            return HorizonSummary(list(horizons), math.nan, math.nan, math.nan, None, len(horizons))
        summary = summarize(learned, largest_distance)
        summary.horizons, summary.not_learned = list(horizons), len(horizons) - len(learned)
        return summary
    if any(math.isinf(h) for h in horizons):
        return HorizonSummary(list(horizons), math.inf, math.nan, math.nan, largest_distance)
    logs = [math.log(h) for h in horizons]
    mean = sum(logs) / len(logs)
    if len(logs) == 1:
        return HorizonSummary(list(horizons), math.exp(mean), math.nan, math.nan, None)
    spread = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1) / len(logs))
    t = _T_975[min(len(logs) - 1, len(_T_975)) - 1]
    return HorizonSummary(list(horizons), math.exp(mean), math.exp(mean - t * spread), math.exp(mean + t * spread), None)
