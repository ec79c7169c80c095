"""The import contracts of pyproject.toml ([tool.importlinter]) hold: entry points over
benchmarks over services over the ``hapo`` library, services independent of each other,
``hapo.algorithm`` free of I/O, and no import circle between sibling modules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [4-9]\d* kept, 0 broken", result.stdout), result.stdout
