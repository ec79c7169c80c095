"""Training problems: the built-in generated arithmetic task, or a local JSONL/Parquet file
with ``prompt`` and ``answer`` columns (GSM8K, DAPO-Math-17k layouts)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"


class Problem(NamedTuple):
    question: str
    answer: str


def addition_problem(rng: random.Random, digits: int) -> Problem:
    """``a + b`` with ``digits``-digit operands, asking for just the number."""
    high = 10**digits - 1
    a, b = rng.randint(0, high), rng.randint(0, high)
    return Problem(f"What is {a} + {b}? Answer with just the number.", str(a + b))


def _read_file(path: Path) -> list[Problem]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=["prompt", "answer"]).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    problems = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"{path}: row {number} lacks a 'prompt' or 'answer' column")
        problems.append(Problem(str(row["prompt"]), str(row["answer"])))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def problem_stream(spec: str, seed: int) -> Iterator[Problem]:
    """Endless problems: ``builtin:addition`` (single-digit), ``builtin:addition2``
    (two-digit), or a file, reshuffled every epoch. Deterministic for a seed."""
    rng = random.Random(seed)
    if spec.startswith(BUILTIN_PREFIX):
        digits = {"addition": 1, "addition2": 2}.get(spec.removeprefix(BUILTIN_PREFIX))
        if digits is None:
            raise ValueError(f"unknown built-in task {spec!r}: use builtin:addition(2)")
        while True:
            yield addition_problem(rng, digits)
    problems = _read_file(Path(spec).expanduser())
    while True:
        order = list(range(len(problems)))
        rng.shuffle(order)
        for index in order:
            yield problems[index]


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, max_prompt_length: int
) -> list[int]:
    """The question as a user turn under the model's chat template, ready for the
    assistant's answer; its last ``max_prompt_length`` tokens. Training and ``hapo eval``
    both prompt this way."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"][-max_prompt_length:]  # fmt: skip
