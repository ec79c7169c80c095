"""The kustomize-subset renderer used by the k8s tests: its merge rules, and that it refuses
what it does not implement instead of rendering something kustomize would not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import K8S, SECRET_FILES, write_user_secrets
from tests.deploy.kustomize import UnsupportedKustomization, render, strategic_merge


def test_merge_rules() -> None:
    base = {
        "replicas": 2,
        "template": {
            "containers": [
                {"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}], "args": ["p"]},
                {"name": "b", "image": "y"},
            ],
            "volumes": [{"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
        },
    }
    patch = {
        "replicas": None,
        "template": {
            "containers": [
                {"name": "a", "env": [{"name": "F", "value": "2"}], "args": ["q", "r"]},
            ],
            "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "2Gi"}}, {"name": "w"}],
            "tolerations": [{"key": "k"}],
        },
    }
    merged = strategic_merge(base, patch)
    assert "replicas" not in merged
    (a, b) = merged["template"]["containers"]
    assert a == {
        "name": "a",
        "image": "x",
        "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}],
        "args": ["q", "r"],
    }
    assert b == {"name": "b", "image": "y"}
    assert merged["template"]["volumes"] == [
        {"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        {"name": "w"},
    ]
    assert base["template"]["volumes"][0]["emptyDir"]["sizeLimit"] == "1Gi"  # not mutated


def test_refuses_unsupported_patches() -> None:
    with pytest.raises(UnsupportedKustomization, match=r"\$-directives"):
        strategic_merge({"a": 1}, {"$patch": "delete"})
    with pytest.raises(UnsupportedKustomization, match="merge key"):
        strategic_merge({"rules": [{"x": 1}]}, {"rules": [{"x": 2}]})
    with pytest.raises(UnsupportedKustomization, match="needs 'name'"):
        strategic_merge({"containers": [{"name": "a"}]}, {"containers": [{"image": "x"}]})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns(*SECRET_FILES))
    write_user_secrets(root)
    (root / "base/api-token.env").write_text("# comment\nHAPO_API_TOKEN=t\n")
    return root


def edit(path: Path, change) -> None:
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))


def test_renders_and_refuses_broken_kustomizations(tree: Path) -> None:
    assert render(tree / "overlays/cpu")
    (tree / "base/api-token.env").unlink()
    with pytest.raises(UnsupportedKustomization, match="does not exist"):
        render(tree / "base")
    (tree / "base/api-token.env").write_text("HAPO_API_TOKEN t\n")
    with pytest.raises(UnsupportedKustomization, match="KEY=VALUE"):
        render(tree / "base")
    (tree / "base/api-token.env").write_text("HAPO_API_TOKEN=t\n")

    cpu = tree / "overlays/cpu/kustomization.yaml"
    edit(cpu, lambda k: k.__setitem__("namePrefix", "x-"))
    with pytest.raises(UnsupportedKustomization, match="namePrefix"):
        render(tree / "overlays/cpu")
    edit(cpu, lambda k: (k.pop("namePrefix"), k["patches"][0]["target"].update(name="rollut")))
    with pytest.raises(UnsupportedKustomization, match="rollut"):
        render(tree / "overlays/cpu")
    edit(cpu, lambda k: k["patches"][0].update(path="../gpu-single/trainer-gpu.yaml"))
    with pytest.raises(UnsupportedKustomization, match="outside"):
        render(tree / "overlays/cpu")
    edit(cpu, lambda k: k["patches"][0].update(path="rollout-replicas.yaml"))
    edit(cpu, lambda k: k["patches"][0]["target"].update(name="rollout"))
    assert render(tree / "overlays/cpu")
    edit(cpu, lambda k: k["resources"].append("../../trainer/deployment"))
    with pytest.raises(UnsupportedKustomization, match="twice"):
        render(tree / "overlays/cpu")
    base = tree / "base/kustomization.yaml"
    edit(base, lambda k: k["secretGenerator"][0].pop("options"))
    with pytest.raises(UnsupportedKustomization, match="disableNameSuffixHash"):
        render(tree / "base")
