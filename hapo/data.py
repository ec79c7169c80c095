"""Training problems: the built-in generated arithmetic tasks, or a local JSONL/Parquet file
with ``prompt`` and ``answer`` columns (GSM8K, DAPO-Math-17k layouts).

Built-in tasks (``builtin:<name>``):

- ``addition``: single-digit ``a + b``, all 100 facts (the quick demo's task);
- ``addition2``: two-digit operands, the training split: never a held-out problem;
- ``addition2-heldout``: two-digit operands, only held-out problems (evaluation).

The held-out split (``is_heldout``) is about a fifth of the problems, chosen by a stable
hash of the unordered operand pair. ``addition`` has no split: a fifth of its 100 facts,
about 20 problems, is too few to score a model on, and it stays the demo's task unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"
HELDOUT_SUFFIX = "-heldout"
HELDOUT_ONE_IN = 5
"""One problem in this many (about) is held out of training."""

Split = Literal["all", "train", "heldout"]
"""Which problems a built-in task draws: every one, only those outside the held-out
split, or only those in it."""


class Problem(NamedTuple):
    question: str
    answer: str


class BuiltinTask(NamedTuple):
    """A generated addition task: operands with up to ``digits`` digits, from ``split``."""

    digits: int
    split: Split


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "addition": BuiltinTask(1, "all"),
    "addition2": BuiltinTask(2, "train"),
    f"addition2{HELDOUT_SUFFIX}": BuiltinTask(2, "heldout"),
}
"""The built-in tasks by name (``builtin:<name>``)."""


def is_heldout(a: int, b: int) -> bool:
    """Whether ``a + b`` is a held-out problem. A function of the unordered pair, so that
    ``b + a`` is held out with it (a held-out fact is never trained on, in either order),
    through a stable hash: Python's ``hash`` of a str is salted per process."""
    low, high = sorted((a, b))
    digest = hashlib.blake2b(f"{low}+{high}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % HELDOUT_ONE_IN == 0


def addition_problem(rng: random.Random, digits: int, split: Split = "all") -> Problem:
    """``a + b`` with operands of up to ``digits`` digits from ``split``, asking for just
    the number. Draws again until the pair is in the split: uniform over its problems."""
    high = 10**digits - 1
    while True:
        a, b = rng.randint(0, high), rng.randint(0, high)
        if split == "all" or is_heldout(a, b) == (split == "heldout"):
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
    """Endless problems: a built-in task (``BUILTIN_TASKS``), or a file, reshuffled every
    epoch. Deterministic for a seed."""
    rng = random.Random(seed)
    if spec.startswith(BUILTIN_PREFIX):
        task = BUILTIN_TASKS.get(spec.removeprefix(BUILTIN_PREFIX))
        if task is None:
            known = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_TASKS)
            raise ValueError(f"unknown built-in task {spec!r}: use one of {known}")
        while True:
            yield addition_problem(rng, task.digits, task.split)
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
