"""`hapo up --pin`: parsing the pins, and a pinned child running on its CPUs only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from entrypoints.launcher import parse_pins, service_preexec


def test_parse_pins_reads_each_service_cpus() -> None:
    cpu = min(os.sched_getaffinity(0))
    assert parse_pins([f"rollout={cpu}", f"trainer={cpu}"]) == {
        "rollout": {cpu},
        "trainer": {cpu},
    }
    assert parse_pins([]) == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [("rollout", "expected SERVICE=CPUS"), ("learner=0", "expected SERVICE=CPUS"),
     ("trainer=x", "'x' is not a CPU"), ("trainer=100000", "100000 are not among")],
)  # fmt: skip
def test_parse_pins_names_the_bad_value(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--pin '{value}'.*{message}"):
        parse_pins([value])


def test_parse_pins_refuses_a_service_twice() -> None:
    cpu = min(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="trainer is pinned twice"):
        parse_pins([f"trainer={cpu}", f"trainer={cpu}"])


def test_a_pinned_child_and_its_children_run_on_its_cpus_only() -> None:
    cpu = max(os.sched_getaffinity(0))
    # The child starts a grandchild, which inherits the pin, as vLLM's engine core does.
    grandchild = "import os; print(sorted(os.sched_getaffinity(0)))"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True,
        preexec_fn=lambda: service_preexec(os.getppid(), frozenset({cpu})),
    )  # fmt: skip
    assert result.stdout.strip() == f"[{cpu}]"
