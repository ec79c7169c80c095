"""A small kustomize-subset renderer: exactly the features deploy/k8s/ uses, nothing more.

No kustomize binary is available offline, so the tests render the overlays with this.
Supported (anything else raises ``UnsupportedKustomization`` rather than rendering wrong):

- ``resources``: YAML files inside the kustomization's folder, or folders holding a
  ``kustomization.yaml`` (rendered recursively, anywhere).
- ``secretGenerator``: ``name`` + ``envs`` (``KEY=VALUE`` lines, ``#`` comments) with
  ``options.disableNameSuffixHash: true`` (no hash suffix, so no name-reference rewriting).
- ``patches``: ``path`` (a file inside the folder) + ``target`` with ``kind`` and ``name``,
  applied as a strategic-merge patch restricted to: maps merged recursively, ``null``
  deleting a key, scalar lists and ``tolerations`` replaced, and the lists
  ``containers``/``initContainers``/``env``/``volumes`` merged by ``name``,
  ``volumeMounts`` by ``mountPath`` and ``ports`` by ``containerPort`` (the merge keys of
  the Kubernetes API). ``$patch`` directives and other lists of maps are refused. Unlike
  kustomize, a target matching no object is an error.

Objects with the same kind and name twice are an error, as in kustomize.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "secretGenerator"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
REPLACED_LISTS_OF_MAPS = {"tolerations"}

Obj = dict[str, Any]


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this renderer does not implement, or is invalid."""


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UnsupportedKustomization(f"{relative}: file outside {root} (load restrictor)")
    return path


def _load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UnsupportedKustomization(f"secretGenerator: env file {path} does not exist")
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UnsupportedKustomization(f"{path}: '{line}' is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _secret(root: Path, spec: Obj) -> Obj:
    unknown = set(spec) - {"name", "envs", "options"}
    if unknown or spec.get("options") != {"disableNameSuffixHash": True}:
        raise UnsupportedKustomization(
            f"secretGenerator {spec.get('name')}: only name, envs and "
            "options.disableNameSuffixHash=true are supported"
        )
    data: dict[str, str] = {}
    for env in spec.get("envs", []):
        data.update(_env_file(_inside(root, env)))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": spec["name"]},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into ``base`` under the rules in the module docstring."""
    if isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise UnsupportedKustomization(f"{field}: $-directives are not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list):
        if field in MERGE_KEYS:
            key = MERGE_KEYS[field]
            merged = [copy.deepcopy(item) for item in base or []]
            for item in patch:
                if not isinstance(item, dict) or key not in item:
                    raise UnsupportedKustomization(f"{field}: every item needs '{key}'")
                match = [i for i, old in enumerate(merged) if old.get(key) == item[key]]
                if match:
                    merged[match[0]] = strategic_merge(merged[match[0]], item, "")
                else:
                    merged.append(copy.deepcopy(item))
            return merged
        if any(isinstance(item, dict) for item in patch) and field not in REPLACED_LISTS_OF_MAPS:
            raise UnsupportedKustomization(f"{field}: list of maps with no known merge key")
        return copy.deepcopy(patch)
    return patch


def _apply_patch(root: Path, objects: list[Obj], spec: Obj) -> None:
    target = spec.get("target", {})
    if set(spec) != {"path", "target"} or set(target) != {"kind", "name"}:
        raise UnsupportedKustomization(f"patch {spec}: only path + target(kind, name)")
    (patch,) = _load_documents(_inside(root, spec["path"]))
    hits = [
        i
        for i, obj in enumerate(objects)
        if obj.get("kind") == target["kind"] and obj["metadata"]["name"] == target["name"]
    ]
    if not hits:
        raise UnsupportedKustomization(f"patch {spec['path']}: no {target} in {root}")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
    for i in hits:
        objects[i] = strategic_merge(objects[i], body)


def render(folder: Path | str) -> list[Obj]:
    """The objects ``kustomize build folder`` would emit (for the supported subset)."""
    root = Path(folder)
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{root}: unsupported fields {sorted(unknown)}")
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = (root / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += _load_documents(_inside(root, resource))
    objects += [_secret(root, spec) for spec in kustomization.get("secretGenerator", [])]
    for spec in kustomization.get("patches", []):
        _apply_patch(root, objects, spec)
    seen = set()
    for obj in objects:
        ident = (obj.get("kind"), obj["metadata"]["name"])
        if ident in seen:
            raise UnsupportedKustomization(f"{root}: {ident} defined twice")
        seen.add(ident)
    return objects
