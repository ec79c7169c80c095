"""``hapo bench study``: its variants, its bookkeeping across restarts and its figures, on
fake run folders (the ``hapo up`` and ``hapo eval`` it starts are replaced by fakes that
write what they would: no process is started)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import study
from benchmarks.study import (
    VARIANTS,
    Action,
    Job,
    check_settings,
    default_heldout,
    machine_facts,
    main,
    plan,
    save_eval,
    split_overrides,
    study_dtype,
)
from hapo.config import load_config
from hapo.runtime.cpus import cpu_model

# --- variants ------------------------------------------------------------------------


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


PART_KEYS = {
    "adaptive_temperature": "actor_rollout_ref.rollout.adaptive_temperature",
    "token_advantage": "algorithm.adv_estimator",
    "ada_advantage": "actor_rollout_ref.actor.adaptive_advantage",
    "ada_clip": "actor_rollout_ref.actor.adaptive_clip",
}


def _changed_keys(overrides: list[str]) -> set[str]:
    """The config keys where ``overrides`` differ from the default (HAPO) config."""
    hapo = _flat(json.loads(load_config(overrides=[], environ={}).to_json()))
    variant = _flat(json.loads(load_config(overrides=overrides, environ={}).to_json()))
    return {key for key in hapo if hapo[key] != variant[key]}


def test_each_ablation_turns_one_part_off_and_grpo_all_four() -> None:
    assert list(VARIANTS) == [
        "hapo", "grpo", "no_adaptive_temperature", "no_token_advantage", "no_ada_advantage",
        "no_ada_clip",
    ]  # fmt: skip
    hapo = load_config(overrides=VARIANTS["hapo"], environ={})
    actor = hapo.actor_rollout_ref.actor
    assert hapo.algorithm.adv_estimator == "hapo"
    assert hapo.actor_rollout_ref.rollout.adaptive_temperature
    assert actor.adaptive_advantage and actor.adaptive_clip
    # Equal budget: a variant changes its parts' switches and nothing else.
    assert _changed_keys(VARIANTS["hapo"]) == set()
    assert _changed_keys(VARIANTS["grpo"]) == set(PART_KEYS.values())
    for part, key in PART_KEYS.items():
        assert _changed_keys(VARIANTS[f"no_{part}"]) == {key}
    grpo = load_config(overrides=VARIANTS["grpo"], environ={})
    assert grpo.algorithm.adv_estimator == "grpo"


def test_overrides_are_told_apart_from_list_options() -> None:
    # hapo bench drops the "--": a --seeds list must not swallow the overrides after it.
    argv = ["--seeds", "0", "1", "trainer.max_staleness=0", "--dir", "runs/a=b", "seed=3"]
    assert split_overrides(argv) == (
        ["--seeds", "0", "1", "--dir", "runs/a=b"], ["trainer.max_staleness=0", "seed=3"]
    )  # fmt: skip
    after_dashes = ["--steps", "3", "--", "x=1", "odd"]
    assert split_overrides(after_dashes) == (["--steps", "3"], ["x=1", "odd"])


def test_default_heldout_is_the_builtin_split() -> None:
    assert default_heldout("builtin:addition2") == "builtin:addition2-heldout"
    assert default_heldout("builtin:addition") is None  # no split of its 100 facts
    assert default_heldout("data/train.jsonl") is None


# --- bookkeeping ---------------------------------------------------------------------


def _run(study_dir: Path, run_id: str, rewards: list[float] | None = None,
         entropy: float = 1.0, checkpoint: int | None = None,
         accuracy: float | None = None, machine: dict | None = None) -> Path:  # fmt: skip
    """A fake run folder: metrics (one line per reward), a checkpoint folder, an eval (with
    the ``machine`` it ran on, if given)."""
    run = study_dir / "runs" / run_id
    run.mkdir(parents=True)
    if rewards is not None:
        lines = [{"step": step, "time": 100.0 * step, "reward/mean": reward,
                  "entropy/mean": entropy + step / 100, "perf/wall_step_s": 30.0 * step}
                 for step, reward in enumerate(rewards, 1)]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if checkpoint is not None:
        (run / "checkpoints" / f"step_{checkpoint:08d}").mkdir(parents=True)
    if accuracy is not None:
        result = {"mean": accuracy, "n": 200} | ({"machine": machine} if machine else {})
        (run / "eval.json").write_text(json.dumps(result) + "\n")
    return run


def test_plan_sorts_runs_by_what_they_still_need(tmp_path: Path) -> None:
    _run(tmp_path, "hapo-s0", [0.1] * 4, checkpoint=4, accuracy=0.5)  # finished
    _run(tmp_path, "grpo-s0", [0.1] * 4, checkpoint=4)  # trained, not evaluated
    _run(tmp_path, "no_ada_clip-s0", [0.1] * 3, checkpoint=2)  # stopped at step 3
    _run(tmp_path, "hapo-s1", [0.1])  # killed before its first checkpoint
    _run(tmp_path, "grpo-s1", checkpoint=2)  # checkpoint only, metrics lost
    assert plan(tmp_path, ["hapo", "grpo", "no_ada_clip"], [0, 1], steps=4) == [
        Job("hapo", 0, Action.DONE), Job("grpo", 0, Action.EVALUATE),
        Job("no_ada_clip", 0, Action.RESUME), Job("hapo", 1, Action.RESUME),
        Job("grpo", 1, Action.RESUME), Job("no_ada_clip", 1, Action.START),
    ]  # fmt: skip
    # Another budget: step 4's checkpoint is not that study's final one.
    assert plan(tmp_path, ["grpo"], [0], steps=6) == [Job("grpo", 0, Action.RESUME)]


def test_settings_are_kept_and_a_restart_with_others_is_refused(tmp_path: Path) -> None:
    settings = {"steps": 20, "task": "builtin:addition2", "overrides": ["a=1"]}
    check_settings(tmp_path, settings)
    check_settings(tmp_path, dict(settings))
    with pytest.raises(SystemExit, match="steps=20"):
        check_settings(tmp_path, {**settings, "steps": 30})


def test_a_setting_an_older_study_lacks_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text(json.dumps({"steps": 10}))
    check_settings(tmp_path, {"steps": 10, "dtype": "float32"})
    assert json.loads((tmp_path / "study.json").read_text()) == {"steps": 10, "dtype": "float32"}
    with pytest.raises(SystemExit, match="dtype='float32'"):
        check_settings(tmp_path, {"steps": 10, "dtype": "bfloat16"})


def test_the_dtype_is_fixed_at_the_first_start() -> None:
    assert study_dtype("auto", None, "bfloat16") == "bfloat16"  # a new study: the machine's
    assert study_dtype("auto", {"dtype": "float32"}, "bfloat16") == "float32"  # as it began
    assert study_dtype("bfloat16", {"dtype": "float32"}, "float32") == "bfloat16"  # refused later
    assert study_dtype("float32", {"steps": 10}, "bfloat16") == "float32"
    with pytest.raises(SystemExit, match="records no dtype"):
        study_dtype("auto", {"steps": 10}, "float32")


def test_save_eval_keeps_the_last_line_whole(tmp_path: Path) -> None:
    stdout = tmp_path / "eval.out"
    stdout.write_text('INFO vllm starting\n{"mean": 0.25, "n": 4}\n\n')
    assert save_eval(stdout, tmp_path / "eval.json") == {"mean": 0.25, "n": 4}
    assert json.loads((tmp_path / "eval.json").read_text()) == {"mean": 0.25, "n": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.out"]
    with_machine = save_eval(stdout, tmp_path / "eval.json", {"cpu": "x"})
    assert with_machine == {"mean": 0.25, "n": 4, "machine": {"cpu": "x"}}
    assert json.loads((tmp_path / "eval.json").read_text()) == with_machine
    stdout.write_text("Traceback ...\n")
    with pytest.raises(SystemExit, match="not hapo eval's JSON"):
        save_eval(stdout, tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()


def test_a_restarted_study_does_only_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fakes of ``hapo up`` and ``hapo eval`` record their arguments and write what the
    real ones would: metrics and the final checkpoint, the eval's JSON line."""
    ups: list[tuple[str, list[str]]] = []
    evals: list[list[str]] = []

    def fake_up(name: str, overrides: list[str], steps: int, run_dir: Path) -> Path:
        ups.append((name, overrides))
        run = run_dir / name
        (run / "checkpoints" / f"step_{steps:08d}").mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
        return run / "metrics.jsonl"

    def fake_hapo(args: list[str], label: str, log: Path, stdout: Path | None = None) -> None:
        evals.append(args)
        assert stdout is not None
        result = {"mean": 0.5, "n": 8, "ci95": [0.2, 0.8], "ci_method": "wilson"}
        stdout.write_text(f"vLLM log\n{json.dumps(result)}\n")

    monkeypatch.setattr(study, "run_variant", fake_up)
    monkeypatch.setattr(study, "run_hapo", fake_hapo)
    _run(tmp_path, "hapo-s0", [0.1, 0.2], checkpoint=3, accuracy=0.5)
    _run(tmp_path, "grpo-s0", [0.1, 0.2, 0.3], checkpoint=3)
    _run(tmp_path, "hapo-s1", [0.1], checkpoint=1)
    argv = ["--steps", "3", "--seeds", "0", "1", "--variants", "hapo", "grpo",
            "--dir", str(tmp_path), "--eval-n", "8", "data.max_response_length=64"]  # fmt: skip
    result = main(argv)

    user = "data.max_response_length=64"
    train = "data.train_files=builtin:addition2"
    keep = "trainer.checkpoint_keep_last=1"
    dtype = json.loads((tmp_path / "study.json").read_text())["dtype"]  # this machine's auto
    assert dtype in ("float32", "bfloat16")
    precision = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    pinned = [f"rollout.dtype={dtype}", f"trainer.precision={precision}"]
    assert ups == [
        ("hapo-s1", [keep, user, *pinned, "seed=1", train]),
        ("grpo-s1", [keep, user, *pinned, "seed=1", train, *VARIANTS["grpo"]]),
    ]
    evaluated = [args[args.index("--model") + 1] if "--model" in args else "base" for args in evals]
    assert evaluated == ["base"] + [
        str(tmp_path / "runs" / run / "checkpoints" / "step_00000003")
        for run in ("grpo-s0", "hapo-s1", "grpo-s1")
    ]
    for args in evals:
        assert args[:5] == ["eval", "--data", "builtin:addition2-heldout", "--n", "8"]
        assert args[5:8] == [user, *pinned]
    assert result["variants"]["hapo"]["seeds"] == 2 and result["variants"]["grpo"]["seeds"] == 2
    assert result["base"] == {"heldout_mean": 0.5, "heldout_ci95": [0.2, 0.8]}

    machine = json.loads((tmp_path / "runs" / "grpo-s1" / "eval.json").read_text())["machine"]
    assert machine["cpu"] == cpu_model() and machine["cpus"] >= 1
    assert machine["commit"] is None or len(machine["commit"]) >= 7  # a git checkout or not
    assert "Machines:" in (tmp_path / "study.md").read_text()

    # Once everything is finished, a restart runs nothing; another budget is refused.
    ups.clear()
    evals.clear()
    main(argv)
    assert ups == [] and evals == []
    with pytest.raises(SystemExit, match="steps=3"):
        main([*argv[2:], "--steps", "4"])
    other = "bfloat16" if dtype == "float32" else "float32"
    with pytest.raises(SystemExit, match=f"dtype='{dtype}'"):
        main([*argv, "--dtype", other])
    with pytest.raises(SystemExit):  # argparse: set it with --dtype
        main([*argv, "trainer.precision=bf16"])


def test_machine_facts_resolve_what_the_config_leaves_to_the_machine() -> None:
    fixed = machine_facts(["trainer.precision=bf16", "rollout.dtype=float16"])
    assert (fixed["learner_dtype"], fixed["rollout_dtype"]) == ("bfloat16", "float16")
    assert machine_facts(["trainer.precision=fp32"])["learner_dtype"] == "float32"
    # On a CPU machine (the suite runs without a GPU) both ``auto``s follow whether bf16
    # multiplies faster here.
    auto = machine_facts(["trainer.device=cpu"])
    bf16 = {True: "bfloat16", False: "float32"}
    assert auto["rollout_dtype"] == auto["learner_dtype"] == bf16[auto["bf16_faster"]]
    assert not auto["bf16_faster"] or auto["native_bf16"]


# --- report --------------------------------------------------------------------------


def test_report_from_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rewards = {0: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1: [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
               2: [0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}  # fmt: skip
    for seed, accuracy in zip(rewards, [0.5, 0.6, 0.7], strict=True):
        _run(tmp_path, f"hapo-s{seed}", rewards[seed], entropy=1.0 + seed, checkpoint=7,
             accuracy=accuracy)  # fmt: skip
    epyc = {"cpu": "AMD EPYC", "cpus": 2, "native_bf16": False, "rollout_dtype": "float32",
            "learner_dtype": "float32"}  # fmt: skip
    _run(tmp_path, "grpo-s0", [0.2] * 7, checkpoint=7, accuracy=0.3, machine=epyc)
    _run(tmp_path, "grpo-s1", [0.2] * 4, checkpoint=4)  # not finished: left out
    _run(tmp_path, "grpo-s2", [0.2] * 7, checkpoint=7, accuracy=0.4,
         machine=epyc | {"commit": "0e9bc57"})  # fmt: skip
    _run(tmp_path, "no_ada_clip-s5", [0.2] * 7, checkpoint=7, accuracy=0.9)  # hapo has no s5
    (tmp_path / "runs" / "notes").mkdir()
    (tmp_path / "base_eval.json").write_text(
        json.dumps({"mean": 0.2, "ci95": [0.15, 0.26], "ci_method": "wilson"})
    )

    result = main(["--report-only", "--dir", str(tmp_path)])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert list(result["variants"]) == ["hapo", "grpo", "no_ada_clip"]  # VARIANTS order
    hapo = result["variants"]["hapo"]
    assert hapo["seeds"] == 3
    assert hapo["heldout_by_seed"] == {"0": 0.5, "1": 0.6, "2": 0.7}
    half = 4.303 * 0.1 / math.sqrt(3)
    assert hapo["heldout_mean"] == pytest.approx(0.6)
    assert hapo["heldout_ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-3)
    # Last 5 steps: seed 0 -> 0.4, seed 1 -> 0.5, seed 2 -> 0.6; again std 0.1 over 3.
    assert hapo["reward_last_mean"] == pytest.approx(0.5)
    assert hapo["reward_last_ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-3)
    # Entropy 1 + seed + step / 100, steps 3..7: 1.05, 2.05, 3.05 -> 2.05.
    assert hapo["entropy_last_mean"] == pytest.approx(2.05)
    # Step s took 30 s: 7 steps are 30 * 28 s = 14 minutes.
    assert hapo["train_minutes_mean"] == pytest.approx(14.0)
    assert "heldout_minus_hapo_mean" not in hapo
    grpo = result["variants"]["grpo"]
    assert (grpo["seeds"], grpo["heldout_by_seed"]) == (2, {"0": 0.3, "2": 0.4})
    # Paired by seed with hapo: 0.3 - 0.5 and 0.4 - 0.7; mean -0.25, std 0.1 / sqrt(2),
    # t with 1 degree of freedom.
    paired_half = 12.7062 * (0.1 / math.sqrt(2)) / math.sqrt(2)
    assert grpo["paired_seeds"] == 2
    assert grpo["heldout_minus_hapo_mean"] == pytest.approx(-0.25)
    assert grpo["heldout_minus_hapo_ci95"] == pytest.approx(
        [-0.25 - paired_half, -0.25 + paired_half], abs=1e-3
    )
    unpaired = result["variants"]["no_ada_clip"]
    assert unpaired["paired_seeds"] == 0 and unpaired["heldout_minus_hapo_mean"] is None
    assert result["base"] == {"heldout_mean": 0.2, "heldout_ci95": [0.15, 0.26]}

    markdown = (tmp_path / "study.md").read_text()
    assert (
        "| hapo | none | 3 | s0: 0.500, s1: 0.600, s2: 0.700 | 0.600 [0.352, 0.848] | - | "
        "0.500 [0.252, 0.748] | 2.050 | 14.0 |"
    ) in markdown
    assert (
        "| grpo | all | 2 | s0: 0.300, s2: 0.400 | 0.350 [-0.285, 0.985] | "
        "-0.250 [-0.885, 0.385] (2 seeds) | 0.200 [0.200, 0.200] | 1.050 | 14.0 |"
    ) in markdown
    assert "| no_ada_clip | ada_clip | 1 | s5: 0.900 | 0.900 | n/a (0 seeds) |" in markdown
    assert "Base model: held-out accuracy 0.200 [0.150, 0.260]" in markdown
    assert markdown.index("- not recorded: 4 runs") < markdown.index(
        "- AMD EPYC, 2 CPUs, bf16 emulated; rollout float32, learner float32: 1 run"
    )
    assert (
        "- AMD EPYC, 2 CPUs, bf16 emulated; rollout float32, learner float32, code 0e9bc57: 1 run"
        in markdown
    )
    assert (tmp_path / "study_reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_copies_finished_runs_without_checkpoints(tmp_path: Path) -> None:
    study_dir, target = tmp_path / "study", tmp_path / "export"
    (_run(study_dir, "hapo-s0", [0.1, 0.2], checkpoint=2, accuracy=0.5) / "logs").mkdir()
    _run(study_dir, "grpo-s0", [0.1], checkpoint=1)  # unfinished: left out
    check_settings(study_dir, {"steps": 2, "task": "builtin:addition2", "eval_n": 8,
                               "heldout": "builtin:addition2-heldout", "overrides": []})  # fmt: skip

    main(["--report-only", "--dir", str(study_dir), "--export", str(target)])

    exported = sorted(str(path.relative_to(target)) for path in target.rglob("*"))
    assert exported == [
        "runs", "runs/hapo-s0", "runs/hapo-s0/eval.json", "runs/hapo-s0/logs",
        "runs/hapo-s0/metrics.jsonl", "study.json", "study.md", "study_reward.png",
    ]  # fmt: skip
    assert (target / "study.md").read_text() == (study_dir / "study.md").read_text()
    # A study resumed from the export skips the finished run and starts the other afresh.
    assert plan(target, ["hapo", "grpo"], [0], steps=2) == [
        Job("hapo", 0, Action.DONE), Job("grpo", 0, Action.START),
    ]  # fmt: skip
