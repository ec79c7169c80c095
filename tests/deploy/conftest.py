"""Shared fixtures of the deploy tests: the repository's deploy files, loaded and rendered."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Every kustomization a user may build: the base and each overlay.
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu", "overlays/gpu-single")
TEST_TOKEN = "test-token-not-a-secret"
SECRET_FILES = ("api-token.env", "redis-password.env")
"""The git-ignored secret files a user writes into deploy/k8s/base/ first."""


def write_user_secrets(k8s_root: Path) -> None:
    """The files of ``SECRET_FILES`` in ``k8s_root/base``, as a user writes them (every
    secret set to ``TEST_TOKEN``)."""
    (k8s_root / "base" / "api-token.env").write_text(f"HAPO_API_TOKEN={TEST_TOKEN}\n")
    (k8s_root / "base" / "redis-password.env").write_text(f"HAPO_REDIS_PASSWORD={TEST_TOKEN}\n")


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s copied aside with the git-ignored secret files a user writes first."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns(*SECRET_FILES))
    write_user_secrets(root)
    return root


@pytest.fixture(scope="session")
def rendered(k8s_copy: Path) -> dict[str, list[dict[str, Any]]]:
    """Objects of every kustomization, by its path under deploy/k8s/."""
    return {name: render(k8s_copy / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())
