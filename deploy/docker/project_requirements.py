"""Print the project's requirements (pyproject.toml dependencies plus the named extras).

The images install these before copying the code, so a code change rebuilds only the last
layers and never reinstalls torch or vLLM:

    python project_requirements.py pyproject.toml cpu > /tmp/requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"no extra '{extra}' in {pyproject} (have: {sorted(optional)})")
        found += optional[extra]
    return found


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2:])))
