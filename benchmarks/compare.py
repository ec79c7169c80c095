"""Two variants of the whole stack, one after the other with the same seed and budget.

    hapo bench compare --pair hapo-grpo  [--steps 20] [--run-dir DIR] [--pin SERVICE=CPUS ...]
                       [-- overrides ...]
    hapo bench compare --pair async-sync [--steps 20] [--run-dir DIR] [--pin SERVICE=CPUS ...]
                       [-- overrides ...]

Each variant is ``hapo up --steps N`` (all three services as processes, the default
config plus the shared overrides plus the variant's own) under ``DIR/<variant>/``. Pairs:

- ``hapo-grpo``: HAPO (every part on, the default) vs GRPO (``adv_estimator=grpo``, fixed
  temperature, no adaptive clip or advantage): reward per step, both curves in one plot.
- ``async-sync``: ``trainer.max_staleness=1`` (the rollout samples the next step's groups
  while the learner trains) vs ``0`` (on-policy: it waits): end-to-end steps per hour.

``--pin`` pins services to CPUs in both variants (``hapo up --pin``): ``--pin rollout=0
--pin reward=0 --pin trainer=1`` gives rollout and learner a core each, as separate
accelerators would.

Steps per hour count wall time between the first and the last step's metrics lines (the
first step, which includes the engines' warm-up, is the start mark). Writes
``DIR/compare.md`` and ``DIR/compare_reward.png``; last line:
{"bench": "compare", "pair": P, "<a>": {...}, "<b>": {...}, "steps_per_hour_ratio": a / b}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from hapo.report import columns, moving_average, read_metrics

HAPO_PARTS: dict[str, str] = {
    "adaptive_temperature": "actor_rollout_ref.rollout.adaptive_temperature=false",
    "token_advantage": "algorithm.adv_estimator=grpo",
    "ada_advantage": "actor_rollout_ref.actor.adaptive_advantage=false",
    "ada_clip": "actor_rollout_ref.actor.adaptive_clip=false",
}
"""HAPO's four parts (all on by default), each with the override that turns it off."""
PAIRS: dict[str, dict[str, list[str]]] = {
    "hapo-grpo": {"hapo": [], "grpo": list(HAPO_PARTS.values())},
    "async-sync": {
        "async": ["trainer.max_staleness=1"],
        "sync": ["trainer.max_staleness=0"],
    },
}
LAST_STEPS = 5
"""Steps averaged for the "final reward" figure."""


def run_hapo(args: Sequence[str], label: str, log: Path, stdout: Path | None = None) -> None:
    """Run ``hapo ARGS`` (the entry point next to this Python) to its end, its output
    appended to ``log`` (standard output too, unless ``stdout`` names a file of its own).

    Raises:
        SystemExit: the command failed (naming the log).
    """
    command = [str(Path(sys.executable).with_name("hapo")), *args]
    print(f"[{label}] hapo {' '.join(args)}", flush=True)
    started = time.monotonic()
    with log.open("a") as errors, stdout.open("w") if stdout else nullcontext(errors) as output:
        code = subprocess.run(command, stdout=output, stderr=errors).returncode
    if code:
        raise SystemExit(f"[{label}] hapo {args[0]} exited with {code}: see {log}")
    print(f"[{label}] hapo {args[0]} done in {time.monotonic() - started:.0f} s", flush=True)


def stream_prefix(run_dir: Path) -> str:
    """The Redis stream prefix of the runs under ``run_dir``: its own, so that the same
    variant names in another folder are other runs (``services.trainer.resume``), and the
    same in this one, so that a run there resumes."""
    return f"bench-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]}"


def run_variant(
    name: str, overrides: list[str], steps: int, run_dir: Path, pins: Sequence[str] = ()
) -> Path:
    """``hapo up`` of run ``name`` under ``run_dir`` (log: ``run_dir/<name>.up.log``), its
    services pinned by ``pins`` (``SERVICE=CPUS``), on ``run_dir``'s stream prefix unless
    ``overrides`` name one; returns its metrics file. A run of that name already there
    resumes from its newest checkpoint."""
    if not any(override.startswith("redis.stream_prefix=") for override in overrides):
        overrides = [f"redis.stream_prefix={stream_prefix(run_dir)}", *overrides]
    args = ["up", "--steps", str(steps), "--run-dir", str(run_dir),
            *(f"--pin={pin}" for pin in pins), *overrides, f"trainer.run_id={name}"]  # fmt: skip
    run_hapo(args, name, run_dir / f"{name}.up.log")
    return run_dir / name / "metrics.jsonl"


def summarise(metrics: Path) -> dict[str, float]:
    """Steps/hour, rewards and timings of one variant's run."""
    records, _ = read_metrics(metrics)
    cols = columns(records)
    times, reward = cols["time"], cols["reward/mean"]
    if len(times) < 2:
        raise SystemExit(f"{metrics}: fewer than 2 steps, no rate to measure")
    return {
        "steps": float(len(reward)),
        "steps_per_hour": round(3600 * (len(times) - 1) / (times[-1] - times[0]), 1),
        "reward_first": round(float(reward[0]), 4),
        f"reward_last{LAST_STEPS}": round(float(reward[-LAST_STEPS:].mean()), 4),
        "reward_mean": round(float(reward.mean()), 4),
        "learner_s_median": round(float(np.median(cols["perf/step_s"])), 2),
        "wall_step_s_median": round(float(np.median(cols["perf/wall_step_s"][1:])), 2),
        "response_length_last": round(float(cols["reward/response_length_mean"][-1]), 1),
    }


def plot(runs: dict[str, Path], path: Path) -> None:
    """Both variants' reward (batch mean, faint, and 5-step moving average) per step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for index, (name, metrics) in enumerate(runs.items()):
        cols = columns(read_metrics(metrics)[0])
        colour = f"C{index}"
        axes.plot(cols["step"], cols["reward/mean"], color=colour, alpha=0.3)
        smooth = moving_average(cols["reward/mean"], LAST_STEPS)
        axes.plot(cols["step"], smooth, color=colour, label=f"{name} ({LAST_STEPS}-step mean)")
    axes.set(xlabel="step", ylabel="mean reward of the step's samples", title="Reward")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="hapo bench compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pair", choices=sorted(PAIRS), required=True)
    parser.add_argument("--steps", type=int, default=20, help="training steps per variant")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument(
        "--pin", action="append", default=[], metavar="SERVICE=CPUS",
        help="pin a service to CPUs in both variants (hapo up --pin); repeatable",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="config overrides for both variants")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a rate needs two steps)")
    run_dir = args.run_dir / args.pair
    run_dir.mkdir(parents=True, exist_ok=True)
    variants = PAIRS[args.pair]
    runs = {
        name: run_variant(name, [*args.overrides, *own], args.steps, run_dir, args.pin)
        for name, own in variants.items()
    }
    summaries = {name: summarise(metrics) for name, metrics in runs.items()}
    plot(runs, run_dir / "compare_reward.png")
    first, second = variants
    result = {
        "bench": "compare",
        "pair": args.pair,
        "pins": args.pin,
        **summaries,
        "steps_per_hour_ratio": round(
            summaries[first]["steps_per_hour"] / summaries[second]["steps_per_hour"], 3
        ),
    }
    table = ["| variant | " + " | ".join(summaries[first]) + " |",
             "|---|" + "---|" * len(summaries[first])]  # fmt: skip
    table += [f"| {name} | " + " | ".join(str(v) for v in s.values()) + " |"
              for name, s in summaries.items()]  # fmt: skip
    (run_dir / "compare.md").write_text(
        f"# {args.pair}: {args.steps} steps each\n\noverrides: {args.overrides}; "
        f"pins: {args.pin or 'none'}\n\n"
        + "\n".join(table) + "\n\n![reward](compare_reward.png)\n"
    )  # fmt: skip
    print("\n".join(table))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
