"""Plots and a summary of a training run, from its ``metrics.jsonl``.

``hapo report RUN_DIR`` (and the trainer when a run ends) writes ``RUN_DIR/plots/*.png``
and ``RUN_DIR/summary.md``. Only what the file holds is drawn: a plot none of whose keys
has a finite value is skipped, so runs with fewer metrics (older ones, a run stopped at
step 1, a batch without low-entropy tokens) still get a report.

Figures are drawn with matplotlib's object API (``Figure``, no ``pyplot``): no global
backend or display, safe inside a service process; matplotlib is imported only when
drawing, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

MOVING_AVERAGE_STEPS = 10
"""Trailing window of the reward's moving average (fewer steps at the start of a run)."""

Columns = dict[str, np.ndarray]
Band = Callable[[Columns], tuple[np.ndarray, np.ndarray]]


class Plot(NamedTuple):
    """One PNG: lines of ``series`` against the step, an optional shaded band, and an
    optional moving average of the first series."""

    name: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    """``(metrics key, legend label)`` of each line."""
    band: tuple[str, Band] | None = None
    """Legend label and ``(low, high)`` of a shaded band."""
    smooth: bool = False


def _mean_std(columns: Columns) -> tuple[np.ndarray, np.ndarray]:
    mean, std = columns["reward/mean"], columns["reward/std"]
    return mean - std, mean + std


def _p10_p90(columns: Columns) -> tuple[np.ndarray, np.ndarray]:
    return columns["entropy/h_hat_p10"], columns["entropy/h_hat_p90"]


PLOTS = (
    Plot("reward", "Reward", "sequence reward", (("reward/mean", "batch mean"),),
         band=("± std", _mean_std), smooth=True),
    Plot("response_length", "Response length", "tokens",
         (("reward/response_length_mean", "mean"), ("reward/response_length_max", "max"))),
    Plot("entropy", "Token entropy", "nats", (("entropy/mean", "mean over response tokens"),)),
    Plot("h_hat", "Normalised entropy h_hat of trained tokens", "h_hat",
         (("entropy/h_hat_p50", "median"), ("entropy/h_hat_mean", "mean"),
          ("entropy/h_hat_pos_frac", "share with h_hat > 0")),
         band=("10th-90th percentile", _p10_p90)),
    Plot("clipfrac", "Clipped tokens by entropy", "share of tokens clipped",
         (("loss/clipfrac", "all"), ("loss/clipfrac_high_entropy", "high entropy (h_hat > 0)"),
          ("loss/clipfrac_low_entropy", "low entropy (h_hat <= 0)"))),
    Plot("staleness", "Staleness", "policy versions behind",
         (("staleness/mean", "mean"), ("staleness/max", "max"))),
    Plot("rollout_corr", "Behaviour correction pi_prox / mu", "weight",
         (("rollout_corr/weight_mean", "mean"), ("rollout_corr/weight_max", "max"))),
    Plot("mismatch", "Rollout/learner mismatch", "KL (nats) / share of tokens",
         (("rollout_corr/kl", "KL(mu || pi_prox)"),
          ("rollout_corr/truncated_frac", "truncated"), ("rollout_corr/masked_frac", "masked"))),
    Plot("temperature", "Sampling temperature T_dyn", "temperature",
         (("entropy/t_dyn_mean", "mean"), ("entropy/t_dyn_min", "min"),
          ("entropy/t_dyn_max", "max"))),
)  # fmt: skip


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The step records of a ``metrics.jsonl`` and how many lines did not parse (a run
    killed mid-write leaves a partial last line)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad += 1
    return records, bad


def _number(value: object) -> float:
    """A metric value as a float; NaN for anything missing or not a number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


def columns(records: list[dict]) -> Columns:
    """Every scalar key as an array over the records (NaN where a record lacks it)."""
    keys = {key for record in records for key in record}
    return {key: np.array([_number(record.get(key)) for record in records]) for key in keys}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values at or before each position
    (NaN until one exists)."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    lagged_sums = np.concatenate([np.zeros(window), sums[:-window]])[: len(values)]
    lagged_counts = np.concatenate([np.zeros(window), counts[:-window]])[: len(values)]
    in_window = counts - lagged_counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(in_window > 0, (sums - lagged_sums) / in_window, np.nan)


def _has(cols: Columns, key: str) -> bool:
    return key in cols and bool(np.isfinite(cols[key]).any())


def draw(plot: Plot, cols: Columns, path: Path) -> bool:
    """Draw ``plot`` to ``path``; False (nothing written) when it has no data."""
    present = [(key, label) for key, label in plot.series if _has(cols, key)]
    if not present:
        return False
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    steps = cols["step"]
    if plot.band is not None:
        label, band = plot.band
        try:
            low, high = band(cols)
            axes.fill_between(steps, low, high, alpha=0.2, label=label)
        except KeyError:
            pass  # the band's keys are absent: the lines alone
    for key, label in present:
        axes.plot(steps, cols[key], marker="." if len(steps) < 50 else None, label=label)
    if plot.smooth:
        key, label = present[0]
        window = MOVING_AVERAGE_STEPS
        axes.plot(steps, moving_average(cols[key], window), label=f"{window}-step moving average")
    axes.set(title=plot.title, xlabel="step", ylabel=plot.ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return True


def _at(values: np.ndarray, steps: np.ndarray, index: int) -> str:
    return f"{values[index]:.4g} (step {int(steps[index])})"


def _reward_table(cols: Columns) -> list[str]:
    steps, raw = cols["step"], cols["reward/mean"]
    smooth = moving_average(raw, MOVING_AVERAGE_STEPS)
    finite = np.flatnonzero(np.isfinite(raw))
    first, last = finite[0], finite[-1]
    rows = [
        f"| | batch mean | {MOVING_AVERAGE_STEPS}-step moving average |",
        "|---|---|---|",
        f"| first | {_at(raw, steps, first)} | {_at(smooth, steps, first)} |",
        f"| last | {_at(raw, steps, last)} | {_at(smooth, steps, last)} |",
        f"| best | {_at(raw, steps, int(np.nanargmax(raw)))} "
        f"| {_at(smooth, steps, int(np.nanargmax(smooth)))} |",
    ]
    return ["## Reward", "", *rows, ""]


def _totals(cols: Columns) -> list[str]:
    """Time, samples, tokens and throughput over the run, for the keys present."""

    def total(key: str) -> float:
        return float(np.nansum(cols[key]))

    lines = []
    if _has(cols, "perf/step_s"):
        lines.append(f"- learner time: {total('perf/step_s'):.1f} s")
    if _has(cols, "perf/weight_sync_s"):
        lines.append(f"- weight sync time: {total('perf/weight_sync_s'):.1f} s")
    if _has(cols, "perf/samples"):
        lines.append(f"- samples trained: {total('perf/samples'):.0f}")
    if _has(cols, "perf/tokens_per_s") and _has(cols, "perf/step_s"):
        tokens = float(np.nansum(cols["perf/tokens_per_s"] * cols["perf/step_s"]))
        lines.append(f"- tokens trained (prompt + response): {tokens:.0f}")
        overall = tokens / total("perf/step_s")
        median = np.nanmedian(cols["perf/tokens_per_s"])
        lines.append(f"- learner throughput: {overall:.0f} tokens/s (median step {median:.0f})")
    if _has(cols, "staleness/mean"):
        lines.append(f"- staleness: mean {np.nanmean(cols['staleness/mean']):.2f} versions")
    if _has(cols, "staleness/max"):
        lines.append(f"- staleness: max {np.nanmax(cols['staleness/max']):.0f} versions")
    if _has(cols, "staleness/dropped_samples"):
        dropped = total("staleness/dropped_samples")
        lines.append(f"- samples left out of the loss as too stale: {dropped:.0f}")
    if _has(cols, "loss/clipfrac"):
        clipped = cols["loss/clipfrac"]
        lines.append(
            f"- clipped tokens: mean {np.nanmean(clipped):.4f} a step, "
            f"{int(np.sum(clipped > 0))} of {len(clipped)} steps above 0"
        )
    if _has(cols, "rollout_corr/kl"):
        lines.append(f"- rollout/learner KL: mean {np.nanmean(cols['rollout_corr/kl']):.4f}")
    return ["## Totals", "", *lines, ""] if lines else []


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/summary.md`` from
    ``run_dir/metrics.jsonl``; returns the summary's path.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
    """
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    lines = [f"# Run {run_dir.name}", ""]
    if not records:
        lines.append("No training step recorded in `metrics.jsonl`.")
    else:
        records.sort(key=lambda record: record["step"])
        cols = columns(records)
        steps = cols["step"]
        lines += [f"{len(records)} steps ({int(steps[0])}-{int(steps[-1])}).", ""]
        if _has(cols, "reward/mean"):
            lines += _reward_table(cols)
        lines += _totals(cols)
        lines += ["## Plots", ""]
        for plot in PLOTS:
            drawn = draw(plot, cols, plots_dir / f"{plot.name}.png")
            lines.append(f"![{plot.title}](plots/{plot.name}.png)" if drawn else
                         f"{plot.title}: not drawn, no data.")  # fmt: skip
            lines.append("")
    if bad:
        lines += ["", f"{bad} line(s) of `metrics.jsonl` could not be read and were skipped."]
    summary = run_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
