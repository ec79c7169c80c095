"""Evaluation: problem selection, the 95% intervals, and real vLLM runs on the tiny model
checked against transformers' greedy decoding.

The scorer child process imports this module for ``odd_length``: torch, transformers and
vLLM are imported inside the tests that use them, so that import stays quick.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from entrypoints.evaluate import (
    EVAL_SEED,
    Z_95,
    confidence_interval,
    eval_problems,
    sample_and_score,
    wilson_interval,
)
from hapo.data import chat_prompt_ids, problem_stream
from tests.entrypoints.test_cli import run as run_cli
from tests.services.rollout.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
SCORER = "tests.entrypoints.test_evaluate:odd_length"
SCORER_OVERRIDES = (f"reward.scorer={SCORER}", "reward.timeout_s=60")  # slow when loaded
MAX_TOKENS = 12


def odd_length(response: str, answer: str) -> float:
    """A scorer that a random model scores both ways on: 1 for an odd-length response."""
    return float(len(response) % 2)


# --- intervals -----------------------------------------------------------------------


def test_wilson_known_values() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(Z_95**2 / (10 + Z_95**2))
    assert wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + Z_95**2))
    # 40 of 100: the textbook (0.3094, 0.4980)
    assert wilson_interval(40, 100) == pytest.approx((0.3094, 0.4980), abs=1e-4)


@given(st.integers(1, 10_000), st.data())
def test_wilson_contains_the_proportion_and_is_symmetric(n: int, data: st.DataObject) -> None:
    successes = data.draw(st.integers(0, n))
    low, high = wilson_interval(successes, n)
    assert 0 <= low <= successes / n <= high <= 1
    mirror_low, mirror_high = wilson_interval(n - successes, n)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low), abs=1e-12)


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=2, max_size=300))
def test_normal_interval_of_graded_scores(scores: list[float]) -> None:
    method, interval = confidence_interval(scores)
    if set(scores) <= {0.0, 1.0}:
        assert method == "wilson"
        assert interval == wilson_interval(sum(scores), len(scores))
        return
    assert method == "normal"
    half = Z_95 * statistics.stdev(scores) / math.sqrt(len(scores))
    mean = statistics.fmean(scores)
    assert interval == pytest.approx((mean - half, mean + half))


def test_one_graded_problem_has_no_interval() -> None:
    assert confidence_interval([0.5]) == ("normal", None)
    assert confidence_interval([1.0]) == ("wilson", wilson_interval(1, 1))


@pytest.mark.parametrize(("p", "n"), [(0.1, 50), (0.5, 30), (0.9, 200)])
def test_wilson_covers_about_95_percent(p: float, n: int) -> None:
    rng = np.random.default_rng(0)
    successes = rng.binomial(n, p, size=4000)
    covered = [low <= p <= high for low, high in (wilson_interval(s, n) for s in successes)]
    assert 0.93 <= np.mean(covered) <= 0.975


def test_normal_interval_of_mean_at_k_covers_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(size=100_000)  # each problem's chance of a correct sample
    truth, covered = difficulty.mean(), []
    for _ in range(1000):
        problems = rng.choice(difficulty, size=100)
        scores = rng.binomial(4, problems) / 4  # mean@4
        low, high = confidence_interval(scores.tolist())[1]
        covered.append(low <= truth <= high)
    assert 0.93 <= np.mean(covered) <= 0.97


# --- problems ------------------------------------------------------------------------


def test_builtin_addition_has_exactly_its_100_problems() -> None:
    problems = eval_problems("builtin:addition", 1000)
    expected = {
        f"What is {a} + {b}? Answer with just the number." for a in range(10) for b in range(10)
    }
    assert {p.question for p in problems} == expected and len(problems) == 100


def test_eval_problems_are_distinct_deterministic_and_not_training_order() -> None:
    problems = eval_problems("builtin:addition2", 200)
    assert len({p.question for p in problems}) == 200
    assert problems == eval_problems("builtin:addition2", 200, EVAL_SEED)
    training = problem_stream("builtin:addition2", 0)
    assert [next(training) for _ in range(20)] != problems[:20]


def test_file_problems_dedupe_and_stop_at_the_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i % 5}", "answer": str(i % 5)} for i in range(8)]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    problems = eval_problems(str(path), 50)
    assert sorted(p.question for p in problems) == [f"q{i}" for i in range(5)]
    assert len(eval_problems(str(path), 3)) == 3


# --- real vLLM runs ------------------------------------------------------------------


def transformers_greedy(model_dir: Path, questions: list[str]) -> list[str]:
    """Greedy responses by transformers (fp32), decoded as the reward service decodes."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    decoder = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = []
    for question in questions:
        ids = torch.tensor([chat_prompt_ids(tokenizer, question, 256)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        texts.append(decoder.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return texts


@pytest.mark.slow
async def test_greedy_matches_transformers_and_mean_at_k_samples(tiny_model_dir: Path) -> None:
    from hapo.inference.engine import build_engine

    config = tiny_config(
        tiny_model_dir, f"data.max_response_length={MAX_TOKENS}", *SCORER_OVERRIDES
    )
    problems = eval_problems("builtin:addition2", 4)
    engine = build_engine(config, adaptive_processor=False)
    try:
        greedy = await sample_and_score(engine, config, problems, 1, 0.0)
        sampled = await sample_and_score(engine, config, problems, 3, 1.0)
    finally:
        engine.shutdown()
    expected = transformers_greedy(tiny_model_dir, [p.question for p in problems])
    assert [result.responses for result in greedy] == [[text] for text in expected]
    assert [result.rewards for result in greedy] == [[odd_length(t, "")] for t in expected]
    assert [r.question for r in greedy] == [p.question for p in problems]
    assert len({result.score for result in greedy}) == 2  # the check above can fail both ways
    for result in sampled:
        assert len(result.responses) == 3 and result.reasons == ["custom"] * 3
        assert result.rewards == [odd_length(text, "") for text in result.responses]
    assert any(len(set(result.responses)) > 1 for result in sampled)


@pytest.mark.slow
def test_cli_eval_prints_the_json_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "set.jsonl"
    questions = ["What is 2 + 2?", "Name a colour.", "Say hi.", "Count to three."]
    data.write_text("".join(json.dumps({"prompt": q, "answer": "4"}) + "\n" for q in [*questions, questions[0]]))  # fmt: skip
    samples = tmp_path / "samples.jsonl"
    result = run_cli(
        "eval", "--model", str(tiny_model_dir), "--data", str(data), "--n", "10",
        "--samples", str(samples), "rollout.dtype=float32", "rollout.max_model_len=256",
        f"data.max_response_length={MAX_TOKENS}", *SCORER_OVERRIDES,
        env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    per_problem = [json.loads(row) for row in samples.read_text().splitlines()]
    scores = [row["score"] for row in per_problem]
    assert sorted(row["question"] for row in per_problem) == sorted(questions)
    assert scores == [odd_length(row["responses"][0], "") for row in per_problem]
    expected = transformers_greedy(tiny_model_dir, [row["question"] for row in per_problem])
    assert [row["responses"] for row in per_problem] == [[text] for text in expected]
    assert line.pop("wall_s") > 0
    assert line == {
        "eval": "greedy", "model": str(tiny_model_dir), "data": str(data), "n": 4, "k": 1,
        "temperature": 0.0, "mean": sum(scores) / 4,
        "ci95": list(wilson_interval(sum(scores), 4)), "ci_method": "wilson",
    }  # fmt: skip


def test_cli_eval_refuses_bad_arguments_before_starting_vllm(tmp_path: Path) -> None:
    cases = [
        (["--k", "4"], "--temperature > 0"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--data", "builtin:subtraction"], "unknown built-in task"),
        (["--data", str(tmp_path / "missing.jsonl")], "--data"),
    ]
    for args, message in cases:
        result = run_cli("eval", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
