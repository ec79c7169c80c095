"""Reward functions: verifiable math answers, answer format, DAPO overlong penalty.

Pure functions of text and lengths (no I/O, no time limits: the reward service runs them
under its own). ``math_reward`` decides plain-integer answers (GSM8K's) with a fast exact
path and hands everything else (LaTeX, fractions, decimals, sets) to math-verify, whose
verdict the fast path reproduces wherever it applies (tested against it).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

# A number-like token: integer, decimal, scientific or fraction.
_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
# Characters that may stand right before / after a final answer the fast path decides
# ("**" only as markdown bold, not "3*4"); anything else ("a90b", "(12)", "30-12") is left
# to math-verify.
_ANSWER_BEFORE = frozenset(" \t\n$=:")
_ANSWER_AFTER = frozenset(" \t\n.,!%*:;?")
_OPERATORS = frozenset("+-*/^×÷")


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is delimited as a final answer, not an operand."""
    if text[max(start - 2, 0) : start] == "**":  # markdown bold: **42**
        return end == len(text) or text[end] in _ANSWER_AFTER
    if start and text[start - 1] not in _ANSWER_BEFORE:
        return False
    preceding = text[:start].rstrip()
    if preceding and (preceding[-1] in _OPERATORS or preceding.rstrip(".")[-1:].isdigit()):
        return False  # an operand: "3 + 4", "2 ** 5", "12 34", "12. -3"
    return end == len(text) or text[end] in _ANSWER_AFTER


_PLAIN_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")
_BOXED = "\\boxed{"
_GSM8K_ANSWER = re.compile(r"####\s*(.+)")


class Score(NamedTuple):
    """A reward and why it was given."""

    reward: float
    reason: str


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; None if absent or unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position]
    return None


def plain_integer(text: str) -> int | None:
    """``text`` as an integer if it is one plainly (``-1,234``, ``$12``, ``50%``, ``7.``)."""
    candidate = text.strip().removeprefix("$").removesuffix(".").removesuffix("%").strip()
    if _PLAIN_INTEGER.fullmatch(candidate):
        return int(candidate.replace(",", ""))
    return None


def fast_integer_answer(response: str) -> int | None:
    """The response's final answer when it is unambiguously a plain integer, else None.

    The answer is the single ``\\boxed{}`` if there is one, else the last number-like
    token. None (undecided: ask math-verify) for several boxes, non-integer tokens
    (``3.5``, ``1/2``, ``2e3``) or no number at all.
    """
    if response.count(_BOXED) > 1:
        return None
    boxed = _last_boxed(response)
    if boxed is not None:
        return plain_integer(boxed)
    if _BOXED in response:
        return None
    last = None
    for last in _NUMBER.finditer(response):  # noqa: B007 (only the last match is wanted)
        pass
    if last is None:
        return None
    if not _stands_alone(response, *last.span()):
        return None
    return plain_integer(last.group())


def gold_integer(answer: str) -> int | None:
    """A gold answer as a plain integer (GSM8K's ``#### 72`` form accepted), else None."""
    gsm8k = _GSM8K_ANSWER.search(answer)
    return plain_integer(gsm8k.group(1) if gsm8k else answer)


def math_verify_reward(response: str, answer: str) -> Score:
    """Correctness by math-verify: 1 when the response's final answer equals the gold."""
    from math_verify import parse, verify

    gold = parse(answer, parsing_timeout=None)
    if not gold:
        return Score(0.0, "unparsable_gold")
    predicted = parse(response, parsing_timeout=None)
    if not predicted:
        return Score(0.0, "no_answer")
    correct = verify(gold, predicted, timeout_seconds=None)
    return Score(1.0, "correct") if correct else Score(0.0, "wrong")


def math_reward(response: str, answer: str) -> Score:
    """Verifiable math reward: 1 for a correct final answer, 0 otherwise, with the reason."""
    gold = gold_integer(answer)
    if gold is not None:
        predicted = fast_integer_answer(response)
        if predicted is not None:
            return Score(1.0, "correct") if predicted == gold else Score(0.0, "wrong")
    gsm8k = _GSM8K_ANSWER.search(answer)
    return math_verify_reward(response, gsm8k.group(1) if gsm8k else answer)


def has_final_answer(response: str) -> bool:
    """Format check: the response states a final answer in ``\\boxed{}``."""
    return _last_boxed(response) is not None


def overlong_penalty(
    response_length: int, max_response_length: int, buffer_length: int, penalty_factor: float
) -> float:
    """DAPO's soft overlong penalty: 0 up to ``max - buffer`` tokens, then falling linearly
    to ``-penalty_factor`` at ``max_response_length``."""
    expected = max_response_length - buffer_length
    excess = response_length - expected
    return min(-excess / buffer_length * penalty_factor, 0.0)


ScoreFn = Callable[[str, str], Score | float]


def load_score_fn(spec: str) -> ScoreFn:
    """A scorer by name: ``math``, or ``package.module:function`` taking
    ``(response_text, gold_answer)`` and returning a float or a ``Score``."""
    if spec == "math":
        return math_reward
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"scorer '{spec}' is neither 'math' nor 'module:function'")
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise ValueError(f"scorer '{spec}': {module_name} has no function {attribute}")
    return function


@dataclass(frozen=True)
class RewardFunction:
    """The configured reward: correctness by ``scorer``, plus an optional format bonus and
    the optional DAPO overlong penalty. Picklable; the scorer is imported on first use."""

    scorer: str = "math"
    format_reward: float = 0.0
    max_scored_chars: int = 8192
    overlong_enable: bool = False
    overlong_len: int = 16
    overlong_penalty_factor: float = 1.0
    max_response_length: int = 64

    def __call__(self, response: str, answer: str, response_length: int) -> Score:
        """Score one response (its last ``max_scored_chars`` characters) of
        ``response_length`` tokens against the gold ``answer``."""
        result = _load_cached(self.scorer)(response[-self.max_scored_chars :], answer)
        score = result if isinstance(result, Score) else Score(float(result), "custom")
        reward = score.reward
        if self.format_reward and has_final_answer(response):
            reward += self.format_reward
        if self.overlong_enable:
            reward += overlong_penalty(
                response_length,
                self.max_response_length,
                self.overlong_len,
                self.overlong_penalty_factor,
            )
        return Score(reward, score.reason)


@functools.cache
def _load_cached(spec: str) -> ScoreFn:
    return load_score_fn(spec)
