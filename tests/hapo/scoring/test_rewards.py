"""Math, format and overlong rewards; the integer fast path agrees with math-verify."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo.scoring.rewards import (
    RewardFunction,
    Score,
    fast_integer_answer,
    gold_integer,
    load_score_fn,
    math_reward,
    math_verify_reward,
    overlong_penalty,
    plain_integer,
)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The answer is 72.", "72", Score(1.0, "correct")),
        ("so the total is \\boxed{72}", "72", Score(1.0, "correct")),
        ("#### 1,000", "1000", Score(1.0, "correct")),
        ("She pays $12.", "12", Score(1.0, "correct")),
        ("It is 50%", "50", Score(1.0, "correct")),
        ("The result is **18**", "18", Score(1.0, "correct")),
        ("x = -3", "-3", Score(1.0, "correct")),
        ("It is 7 \\boxed{8}", "7", Score(0.0, "wrong")),  # the box wins
        ("I think 5. No wait, it is 6", "5", Score(0.0, "wrong")),
        ("72 apples. Check: 72-2=70", "72", Score(0.0, "wrong")),  # the last number is the answer
        ("\\boxed{\\frac{1}{2}}", "0.5", Score(1.0, "correct")),  # LaTeX: math-verify
        ("\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", Score(1.0, "correct")),
        ("The answer is 3.0", "3", Score(1.0, "correct")),
        ("\\boxed{\\{1, 2\\}}", "$\\{2, 1\\}$", Score(1.0, "correct")),  # sets
        ("\\boxed{x^2+1}", "$1+x^2$", Score(1.0, "correct")),  # expressions
        ("I do not know.", "7", Score(0.0, "no_answer")),
        ("The answer is 7", "", Score(0.0, "unparsable_gold")),
        ("Natalia sold 48+24 = 72 clips.\n#### 72", "#### 72", Score(1.0, "correct")),  # GSM8K gold
    ],
)
def test_math_reward_table(response: str, answer: str, expected: Score) -> None:
    assert math_reward(response, answer) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("42", 42), ("-1,234", -1234), ("$12", 12), ("50%", 50), ("7.", 7), (" 3 ", 3),
     ("1,23", None), ("3.5", None), ("1e3", None), ("", None), ("--2", None), ("12a", None)],
)  # fmt: skip
def test_plain_integer(text: str, value: int | None) -> None:
    assert plain_integer(text) == value


@pytest.mark.parametrize(
    "response",
    ["a90b", "(3242)", "3883-3339", "237*4245", "122 2295", "2 ** 10", "1/2", "3.5", "\\boxed{1}\\boxed{2}",
     "\\boxed{x = 2}", "\\boxed{7", "12. -3", "no number"],
)  # fmt: skip
def test_fast_path_leaves_ambiguous_answers_to_math_verify(response: str) -> None:
    assert fast_integer_answer(response) is None


TEMPLATES = [
    "The answer is {a}.", "So we get {b} and then {a}", "\\boxed{{{a}}}", "#### {a}", "{b} + {c} = {a}",
    "Total: ${a}", "It is {a}%", "{a} apples", "First {a}, then {b}.", "x = {a}", "The result is **{a}**",
    "We have {b}/{c} = {a}", "Answer: {a}\n", "({a})", "{a}!", "is -{a}", "{b}-{a}", "a{a}b", "{b}*{a}",
    "step 1: {b}\nstep 2: {a}", "{a}?", "= {a} dollars", "costs $ {a}.", "{b} ** {a}", "=**{a}**",
    "{a}.{b}", "{b} {a}", "{b}\n{a}", "[{a}]", "{b}={a}", "{b} = -{a}", "{b}, {a}", "{b}. {a}", "{b}: -{a}.",
]  # fmt: skip
numbers = st.integers(-60, 5000).flatmap(lambda n: st.sampled_from([str(n), f"{n:,}"]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEMPLATES), numbers, numbers, numbers, st.booleans())
def test_fast_path_agrees_with_math_verify(template, a, b, c, gold_is_prediction) -> None:
    response = template.format(a=a, b=b, c=c)
    predicted = fast_integer_answer(response)
    gold = str(predicted) if gold_is_prediction and predicted is not None else a
    if predicted is None or gold_integer(gold) is None:
        return
    assert math_reward(response, gold).reward == math_verify_reward(response, gold).reward


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_scoring_arbitrary_text_never_raises(text: str) -> None:
    score = math_reward(text, "42")
    assert score.reward in (0.0, 1.0)
    fast_integer_answer(text)


def test_overlong_penalty() -> None:
    # max 64, buffer 16: free up to 48 tokens, then linear down to -factor at 64.
    assert overlong_penalty(40, 64, 16, 1.0) == 0.0
    assert overlong_penalty(48, 64, 16, 1.0) == 0.0
    assert overlong_penalty(56, 64, 16, 1.0) == -0.5
    assert overlong_penalty(64, 64, 16, 0.5) == -0.5


def test_reward_function_combines_parts() -> None:
    plain = RewardFunction(max_response_length=64)
    assert plain("\\boxed{4}", "4", 10) == Score(1.0, "correct")
    shaped = RewardFunction(
        format_reward=0.1, overlong_enable=True, overlong_len=16, max_response_length=64
    )
    assert shaped("\\boxed{4}", "4", 56) == Score(pytest.approx(0.6), "correct")
    assert shaped("4", "4", 10) == Score(1.0, "correct")  # no box: no format bonus
    tail = RewardFunction(max_scored_chars=64)
    assert tail("\\boxed{9}" + " filler" * 100 + " so 4", "4", 10).reason == "correct"


def user_scorer(response: str, answer: str) -> float:
    return float(len(response) == len(answer))


def test_user_scorer_by_module_path() -> None:
    function = RewardFunction(scorer=f"{__name__}:user_scorer")
    assert function("abc", "xyz", 3) == Score(1.0, "custom")
    with pytest.raises(ValueError, match="neither 'math' nor"):
        load_score_fn("not a spec")
    with pytest.raises(ValueError, match="has no function"):
        load_score_fn(f"{__name__}:missing")
