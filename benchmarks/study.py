"""An ablation study of HAPO's parts: every variant trained with several seeds at equal
budget, each final checkpoint scored on problems it never trained on.

    hapo bench study [--steps 20] [--seeds 0 1 2] [--variants NAME ...] [--dir runs/study]
                     [--task builtin:addition2] [--heldout SPEC] [--eval-n 200]
                     [--dtype auto] [--report-only] [--export DIR] [-- overrides ...]

Variants (``VARIANTS``): ``hapo`` (every part on: the default config), ``grpo`` (every part
off), and one part off at a time: ``no_adaptive_temperature``, ``no_token_advantage``
(``adv_estimator=grpo``), ``no_ada_advantage``, ``no_ada_clip`` (the parts and their
switches are ``benchmarks.compare.HAPO_PARTS``). The runs differ only in the variant's
overrides and the seed: same steps, batch, samples per prompt and shared overrides.

Run ``<variant>-s<seed>`` is ``hapo up --steps N --run-dir DIR/runs`` with ``seed=<seed>``,
``data.train_files=<task>`` and ``trainer.run_id=<variant>-s<seed>`` (and, unless overridden,
``trainer.checkpoint_keep_last=1``: a study keeps one checkpoint per run), then ``hapo eval`` of
its final checkpoint on ``--heldout`` (default ``<task>-heldout``: for
``builtin:addition2``, the held-out split that training never draws from), kept as
``DIR/runs/<run id>/eval.json`` with the machine it ran on (``machine``: CPU model, CPUs,
native bf16, the rollout's and the learner's resolved dtypes, the code's commit). The base
model is evaluated once (``DIR/base_eval.json``). Runs go seed by seed (every variant of
seed 0 first), so a study cut short compares all variants on the seeds it finished.

Every run and eval computes in one dtype, rollout and learner alike (``--dtype``, set by
``rollout.dtype`` and ``trainer.precision``): ``auto`` resolves once, at the study's first
start (bfloat16 on a GPU or a CPU whose bf16 products beat fp32's, else float32), and is
kept, so that a study resumed on another machine kind computes as it began.

Resume: start the study again with the same settings (kept in ``DIR/study.json``; a restart
with other ones is refused, runs of other budgets would not compare). A run with its
``eval.json`` is skipped, a run at its final checkpoint is only evaluated, a run stopped
midway continues from its newest checkpoint (``hapo up`` under the same run id), then is
evaluated. Seeds and variants can be added by a later start.

Writes, from the finished runs (``benchmarks.study_report``), ``DIR/study.md``: per
variant the seeds finished, held-out accuracy per seed and over seeds, held-out accuracy
minus hapo's paired by seed, training reward over the last 5 steps (means with Student-t
95% intervals, n - 1 degrees of freedom), token entropy over the last 5 steps and training
minutes (means); the base model's accuracy, and the machines the runs ran on; and
``DIR/study_reward.png``: each variant's reward per step (5-step moving average), mean
over seeds with the min-max band over seeds. ``--report-only`` only writes these.
``--export DIR`` then copies the results (these files, the settings, the base eval and
each finished run's folder, without its checkpoints) to ``DIR``, a study folder small
enough to commit or share; a later start with ``--dir`` set to a copy of it skips those
runs. Last line:
{"bench": "study", ..., "base": {...}, "variants": {name: {"seeds": k, "heldout_mean": m,
"heldout_ci95": [lo, hi], "reward_last_mean": r, "reward_last_ci95": [lo, hi],
"entropy_last_mean": e, "train_minutes_mean": w, "heldout_minus_hapo_mean": d,
"heldout_minus_hapo_ci95": [lo, hi], "paired_seeds": k, ...}}}
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from benchmarks.compare import run_hapo, run_variant
from benchmarks.study_report import (
    BASE_EVAL_FILE,
    EVAL_FILE,
    RUNS,
    SETTINGS_FILE,
    VARIANTS,
    export,
    report,
)
from hapo.config import load_config
from hapo.data import BUILTIN_PREFIX, BUILTIN_TASKS, HELDOUT_SUFFIX
from hapo.report import read_metrics
from hapo.runtime.cpus import (
    allowed_cpus,
    cpu_bf16_is_faster,
    cpu_has_native_bf16,
    cpu_model,
    resolve_rollout_dtype,
)

RUN_DEFAULTS = ["trainer.checkpoint_keep_last=1"]
"""Overrides of every run that the user's can replace: one checkpoint per run (model and
optimizer state) is all that resume and the eval need; a study's dozens of runs would
otherwise keep several each."""
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
"""A config override, ``dotted.key=value``."""
DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
"""``--dtype``: the rollout's dtype and the learner's ``trainer.precision`` it sets."""
DTYPE_KEYS = ("rollout.dtype=", "trainer.precision=")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The study's own arguments and the config overrides (``key=value``) in ``argv``.

    ``hapo bench`` passes the arguments after ``--`` without the ``--``, so a list option
    (``--seeds 0 1 2``) would swallow the overrides that follow it: they are told apart by
    their form instead (everything after a ``--`` still there counts as an override).
    """
    own, overrides = [], []
    for index, arg in enumerate(argv):
        if arg == "--":
            return own, [*overrides, *argv[index + 1 :]]
        (overrides if OVERRIDE.match(arg) else own).append(arg)
    return own, overrides


def default_heldout(task: str) -> str | None:
    """The held-out task of a built-in training task (``builtin:addition2`` ->
    ``builtin:addition2-heldout``), or None if it has none."""
    heldout = task + HELDOUT_SUFFIX
    return heldout if heldout.removeprefix(BUILTIN_PREFIX) in BUILTIN_TASKS else None


# --- bookkeeping ---------------------------------------------------------------------


class Action(enum.StrEnum):
    """What a run still needs."""

    DONE = "done"
    """Evaluated (``eval.json``): skipped."""
    EVALUATE = "evaluate"
    """At its final checkpoint, not evaluated."""
    RESUME = "resume"
    """Started (metrics or checkpoints) but stopped short: ``hapo up`` continues it from its
    newest checkpoint, then it is evaluated."""
    START = "start"
    """Not started: trained from the base model, then evaluated."""


class Job(NamedTuple):
    """One run of the study and what it still needs."""

    variant: str
    seed: int
    action: Action

    @property
    def run_id(self) -> str:
        return f"{self.variant}-s{self.seed}"


def final_checkpoint(run: Path, steps: int) -> Path:
    """The checkpoint folder of a run's last step (the trainer always saves it)."""
    return run / "checkpoints" / f"step_{steps:08d}"


def next_action(run: Path, steps: int) -> Action:
    """What the run in folder ``run`` of a ``steps``-step study still needs."""
    if (run / EVAL_FILE).is_file():
        return Action.DONE
    if final_checkpoint(run, steps).is_dir():
        return Action.EVALUATE
    if (run / "metrics.jsonl").is_file() or (run / "checkpoints").is_dir():
        return Action.RESUME
    return Action.START


def plan(study: Path, variants: Sequence[str], seeds: Sequence[int], steps: int) -> list[Job]:
    """Every run of the study, seed by seed, with what it still needs."""
    return [
        Job(variant, seed, next_action(study / RUNS / f"{variant}-s{seed}", steps))
        for seed in seeds
        for variant in variants
    ]


def check_settings(study: Path, settings: dict) -> None:
    """Keep the study's settings at its first start; refuse a restart with other ones.

    Raises:
        SystemExit: the study in ``study`` ran with other settings.
    """
    path = study / SETTINGS_FILE
    if not path.is_file():
        path.write_text(json.dumps(settings, indent=2) + "\n")
        return
    before = json.loads(path.read_text())
    changed = [key for key in settings if key in before and before[key] != settings[key]]
    if changed:
        was = ", ".join(f"{key}={before[key]!r}" for key in changed)
        raise SystemExit(f"{path}: this study ran with {was}; use those or another --dir")
    if settings.keys() - before.keys():  # a setting the study began without (it is older)
        path.write_text(json.dumps(before | settings, indent=2) + "\n")


def study_dtype(requested: str, saved: dict | None, machine_default: str) -> str:
    """The dtype every run and eval of the study computes in, rollout and learner alike:
    ``requested`` if it is not ``auto``; else the one the study recorded at its first start,
    or for a new study ``machine_default`` (what ``auto`` is on this machine). A study
    resumed on another machine kind thus computes as it began, and its runs compare.

    Raises:
        SystemExit: ``auto``, and the study's settings record no dtype (it began before
            ``--dtype``).
    """
    if requested != "auto":
        return requested
    if saved is None:
        return machine_default
    if "dtype" not in saved:
        raise SystemExit(
            f"{SETTINGS_FILE} records no dtype (the study began before --dtype): give "
            "--dtype float32 or bfloat16, the one its runs computed in (study.md lists them)"
        )
    return saved["dtype"]


def dtype_overrides(dtype: str) -> list[str]:
    """The overrides that make rollout and learner compute in ``dtype``."""
    return [f"rollout.dtype={dtype}", f"trainer.precision={DTYPE_PRECISION[dtype]}"]


def machine_facts(overrides: Sequence[str]) -> dict:
    """The machine a run trains on, what ``auto`` resolved to there and the code's commit:
    the CPU kind decides whether bf16 is native, hence the dtypes and the speed, so runs from
    different kinds are told apart in the report."""
    # Imported here: torch and transformers are only needed by a study that runs.
    import torch

    from hapo.training.policy import compute_dtype, learner_device

    describe = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip

    config = load_config(overrides=overrides)
    learner_dtype = compute_dtype(config, learner_device(config))
    return {
        "cpu": cpu_model(),
        "cpus": len(allowed_cpus()),
        "native_bf16": cpu_has_native_bf16(),
        "bf16_faster": cpu_bf16_is_faster(),
        "rollout_dtype": resolve_rollout_dtype(config.rollout.dtype, torch.cuda.is_available()),
        "learner_dtype": "float32" if learner_dtype is None else "bfloat16",
        "commit": describe.stdout.strip() or None,  # None: not run from a git checkout
    }


def machine_dtype() -> str:
    """What the rollout's ``auto`` resolves to here: bfloat16 on a GPU or a CPU that
    multiplies bf16 faster than fp32."""
    import torch  # here: only a study that runs needs it

    return resolve_rollout_dtype("auto", torch.cuda.is_available())


def save_eval(stdout: Path, target: Path, machine: dict | None = None) -> dict:
    """Keep the last line of ``hapo eval``'s standard output (its JSON result), with the
    ``machine`` it ran on, as ``target``, written under a temporary name and renamed: an
    ``eval.json`` marks a finished run, so a kill must not leave half of one."""
    lines = [line for line in stdout.read_text().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{stdout}: the last line is not hapo eval's JSON result") from None
    if machine is not None:
        result["machine"] = machine
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, target)
    return result


def evaluate(label: str, model: Path | None, heldout: str, n: int, overrides: list[str],
             target: Path) -> None:  # fmt: skip
    """``hapo eval`` of ``model`` (None: the configured base model) on ``n`` problems of
    ``heldout``, its result kept in ``target`` (output next to it, ``*.log``, ``*.out``)."""
    args = ["eval", "--data", heldout, "--n", str(n), *overrides]
    if model is not None:
        args += ["--model", str(model)]
    stdout = target.with_suffix(".out")
    run_hapo(args, label, target.with_suffix(".log"), stdout)
    result = save_eval(stdout, target, machine_facts(overrides))
    print(f"[{label}] held-out accuracy {result['mean']:.3f} on {result['n']}", flush=True)


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{seconds:02d}s"


def run_study(study: Path, jobs: list[Job], steps: int, task: str, heldout: str, eval_n: int,
              overrides: list[str]) -> None:  # fmt: skip
    """Evaluate the base model if not yet done, then train and evaluate each job in turn,
    printing which run, how many of the whole and the time since this start."""
    started = time.monotonic()
    (study / RUNS).mkdir(parents=True, exist_ok=True)
    if not (study / BASE_EVAL_FILE).is_file():
        evaluate("base", None, heldout, eval_n, overrides, study / BASE_EVAL_FILE)
    for number, job in enumerate(jobs, 1):
        run = study / RUNS / job.run_id
        progress = f"[{number}/{len(jobs)} {_elapsed(time.monotonic() - started)}]"
        if job.action is Action.DONE:
            print(f"{progress} {job.run_id}: finished before, skipped", flush=True)
            continue
        if job.action is Action.RESUME:
            metrics = run / "metrics.jsonl"
            logged = len(read_metrics(metrics)[0]) if metrics.is_file() else 0
            print(f"{progress} {job.run_id}: resume ({logged} of {steps} steps logged)",
                  flush=True)  # fmt: skip
        else:
            print(f"{progress} {job.run_id}: {job.action}", flush=True)
        if job.action in (Action.START, Action.RESUME):
            # The study's own settings come after the user's: they define the run.
            own = [f"seed={job.seed}", f"data.train_files={task}", *VARIANTS[job.variant]]
            run_variant(job.run_id, [*RUN_DEFAULTS, *overrides, *own], steps, study / RUNS)
        checkpoint = final_checkpoint(run, steps)
        if not checkpoint.is_dir():
            raise SystemExit(f"[{job.run_id}] hapo up ended without {checkpoint}")
        evaluate(job.run_id, checkpoint, heldout, eval_n, overrides, run / EVAL_FILE)
    print(f"study: {len(jobs)} runs finished in {_elapsed(time.monotonic() - started)}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="hapo bench study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        metavar="VARIANT", help=f"default: all of {', '.join(VARIANTS)}",
    )  # fmt: skip
    parser.add_argument("--dir", type=Path, default=Path("runs/study"), help="the study's folder")
    parser.add_argument("--task", default="builtin:addition2", help="training problems")
    parser.add_argument("--heldout", help="evaluation problems (default: the task's held-out)")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPE_PRECISION], default="auto",
        help="rollout and learner dtype; auto: the study's own, or for a new study bfloat16 "
        "on a GPU or a CPU whose bf16 products beat fp32's, else float32",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true",
                        help="only write the table and plot from the finished runs")  # fmt: skip
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="then copy the results, without checkpoints, to DIR")  # fmt: skip
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    seeds = list(dict.fromkeys(args.seeds))
    variants = list(dict.fromkeys(args.variants))
    if not args.report_only:
        heldout = args.heldout or default_heldout(args.task)
        if heldout is None:
            parser.error(f"--task {args.task} has no built-in held-out split: give --heldout")
        if args.steps < 1 or args.eval_n < 1:
            parser.error("--steps and --eval-n must be >= 1")
        if any(override.startswith(DTYPE_KEYS) for override in overrides):
            parser.error("set rollout.dtype and trainer.precision with --dtype")
        settings_file = args.dir / SETTINGS_FILE
        saved = json.loads(settings_file.read_text()) if settings_file.is_file() else None
        native = machine_dtype()  # imports torch: asked once
        dtype = study_dtype(args.dtype, saved, native)
        args.dir.mkdir(parents=True, exist_ok=True)
        check_settings(args.dir, {"steps": args.steps, "task": args.task, "heldout": heldout,
                                  "eval_n": args.eval_n, "overrides": overrides,
                                  "dtype": dtype})  # fmt: skip
        if dtype == "bfloat16" and native != dtype:
            print("study: bfloat16 is emulated on this CPU; runs will be many times slower",
                  file=sys.stderr)  # fmt: skip
        jobs = plan(args.dir, variants, seeds, args.steps)
        run_study(args.dir, jobs, args.steps, args.task, heldout, args.eval_n,
                  [*overrides, *dtype_overrides(dtype)])  # fmt: skip
    result = report(args.dir)
    if args.export is not None:
        copied = export(args.dir, args.export)
        print(f"exported {len(copied)} finished runs to {args.export}", file=sys.stderr)
    print((args.dir / "study.md").read_text())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
