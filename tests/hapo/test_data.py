"""Training problems: the built-in arithmetic task and local files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hapo.data import problem_stream
from hapo.scoring.rewards import math_reward


def test_builtin_addition_is_seeded_and_correct() -> None:
    first = list(itertools.islice(problem_stream("builtin:addition", seed=3), 50))
    again = list(itertools.islice(problem_stream("builtin:addition", seed=3), 50))
    other = list(itertools.islice(problem_stream("builtin:addition", seed=4), 50))
    assert first == again and first != other
    for question, answer in first:
        a, b = (int(x) for x in question.removeprefix("What is ").split("?")[0].split(" + "))
        assert 0 <= a <= 9 and 0 <= b <= 9 and int(answer) == a + b
        assert math_reward(f"The answer is {answer}.", answer).reward == 1.0
    two_digit = list(itertools.islice(problem_stream("builtin:addition2", seed=0), 200))
    assert max(int(answer) for _, answer in two_digit) > 18


def test_files_cycle_through_every_problem_each_epoch(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        stream = problem_stream(str(path), seed=0)
        for _ in range(2):  # two epochs, each a permutation
            epoch = list(itertools.islice(stream, 5))
            assert sorted(epoch) == sorted((row["prompt"], row["answer"]) for row in rows)


def test_bad_sources_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown built-in task"):
        next(problem_stream("builtin:nope", seed=0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 1 lacks a 'prompt' or 'answer'"):
        next(problem_stream(str(bad), seed=0))
