"""Every container command in docker-compose.yml and in the rendered Kubernetes objects
resolves to a real ``hapo`` command with valid flags (``hapo <command> --help`` runs, and
click parses the exact arguments), and its config file, ``HAPO_*`` environment (image ENV,
compose environment/env_file, pod env) and ``key=value`` overrides load with
``hapo.config.load_config``."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from typer.exceptions import TyperException

from entrypoints.cli import app
from hapo.config import ConfigError, HapoConfig, load_config
from tests.deploy.conftest import (
    KUSTOMIZATIONS,
    REPO,
    SECRET_FILES,
    TEST_TOKEN,
    write_user_secrets,
)
from tests.deploy.kustomize import render

HAPO = Path(sys.executable).with_name("hapo")


class CommandError(Exception):
    """A container command that ``hapo`` does not accept."""


@dataclass
class Case:
    where: str
    argv: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # container path -> text


def image_env() -> dict[str, str]:
    """The HAPO_* variables the images set (ENV lines of the Dockerfile)."""
    text = (REPO / "deploy/docker/Dockerfile").read_text()
    return dict(re.findall(r"\b(HAPO_[A-Z_]+)=(\S+)", text))


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value or TEST_TOKEN
    return pairs


def compose_cases() -> list[Case]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    cases = []
    for name, service in compose["services"].items():
        if not service.get("image", "").startswith("hapo-rl:"):
            continue
        env = image_env() | {k: str(v) for k, v in service.get("environment", {}).items()}
        for item in service.get("env_file", []):
            env |= env_file(REPO / (item["path"] + ".example"))
        files = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./") and (REPO / source).is_file():
                files[target] = (REPO / source).read_text()
        cases.append(Case(f"compose:{name}", ["hapo", *service["command"]], env, files))
    return cases


def pod_cases(where: str, spec: dict[str, Any], objects: list[dict[str, Any]], entrypoint=None):
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec.get("initContainers", []) + spec["containers"]:
        if not container["image"].startswith("hapo-rl:"):
            continue
        env = image_env()
        for item in container.get("env", []):
            env[item["name"]] = item.get("value", TEST_TOKEN)
        files = {}
        for mount in container.get("volumeMounts", []):
            configmap = volumes[mount["name"]].get("configMap")
            if configmap:
                for key, text in configmaps[configmap["name"]]["data"].items():
                    files[f"{mount['mountPath']}/{key}"] = text
        argv = shlex.split(entrypoint) if entrypoint else container["command"] + container["args"]
        yield Case(f"{where}/{container['name']}", argv, env, files)


def k8s_cases() -> list[Case]:
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k8s"
        shutil.copytree(REPO / "deploy/k8s", root, ignore=shutil.ignore_patterns(*SECRET_FILES))
        write_user_secrets(root)
        for kustomization in KUSTOMIZATIONS:
            objects = render(root / kustomization)
            for obj in objects:
                where = f"k8s:{kustomization}:{obj['kind']}/{obj['metadata']['name']}"
                if obj["kind"] in ("Deployment", "StatefulSet"):
                    cases += pod_cases(where, obj["spec"]["template"]["spec"], objects)
                elif obj["kind"] == "RayJob":
                    head = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                    entrypoint = obj["spec"]["entrypoint"]
                    cases += pod_cases(where, head, objects, entrypoint)
    return cases


CASES = compose_cases() + k8s_cases()


def subcommand(argv: list[str]) -> tuple[list[str], list[str]]:
    """(command words, remaining arguments): ``hapo model install -c x`` -> model install."""
    assert argv[0] == "hapo", f"not a hapo command: {argv}"
    group = typer.main.get_command(app)
    words, rest = [], list(argv[1:])
    while rest and hasattr(group, "list_commands"):  # a group: the next word is a command
        group = group.get_command(typer.Context(group), rest[0])
        if group is None:
            raise CommandError(f"no command hapo {' '.join([*words, rest[0]])}")
        words.append(rest.pop(0))
    if not words:
        raise CommandError(f"no hapo command in {argv}")
    return words, rest


def check_command(argv: list[str]) -> None:
    """``hapo WORDS --help`` succeeds and click accepts the exact arguments."""
    words, rest = subcommand(argv)
    result = subprocess.run(
        [str(HAPO), *words, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    command = typer.main.get_command(app)
    for word in words:
        command = command.get_command(typer.Context(command), word)
    try:
        command.make_context(" ".join(words), list(rest))
    except TyperException as exc:  # click's UsageError, vendored by typer
        raise CommandError(f"{argv}: {exc}") from exc


def split_args(rest: list[str]) -> tuple[str | None, list[str]]:
    """(config file, overrides) of a service's arguments: --config/-c, --consumer, k=v."""
    config_file, overrides = None, []
    while rest:
        word = rest.pop(0)
        if word in ("--config", "-c"):
            config_file = rest.pop(0)
        elif word == "--consumer":
            rest.pop(0)
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            raise ConfigError(f"unexpected argument {word!r}")
    return config_file, overrides


def check_config(case: Case, tmp_path: Path) -> HapoConfig:
    """The config the container would load: its file (by container path), env, overrides."""
    _, rest = subcommand(case.argv) if case.argv[1] != "trainer" else (["trainer"], case.argv[2:])
    config_file, overrides = split_args(list(rest))
    local = None
    if config_file is not None:
        assert config_file in case.files, f"{config_file} is not mounted in {case.where}"
        local = tmp_path / "config.yaml"
        local.write_text(case.files[config_file])
    return load_config(local, overrides, environ=case.env)


def distinct_commands() -> list[Any]:
    seen: dict[tuple[str, ...], str] = {}
    for case in CASES:
        seen.setdefault(tuple(case.argv), case.where)
    return [
        pytest.param(list(argv), id=f"{where}:{' '.join(argv)}") for argv, where in seen.items()
    ]


@pytest.mark.parametrize("argv", distinct_commands())
def test_command_is_a_real_hapo_command_with_valid_flags(argv: list[str]) -> None:
    check_command(argv)


@pytest.mark.parametrize("case", CASES, ids=[c.where for c in CASES])
def test_command_config_environment_and_overrides_load(case: Case, tmp_path: Path) -> None:
    check_config(case, tmp_path)


def test_every_service_is_covered_in_compose_and_each_kustomization() -> None:
    expected = {"rollout", "reward", "trainer", "model"}
    assert {c.argv[1] for c in CASES if c.where.startswith("compose:")} == expected
    for kustomization in ("overlays/cpu", "overlays/gpu", "overlays/gpu-single"):
        found = {c.argv[1] for c in CASES if c.where.startswith(f"k8s:{kustomization}:")}
        assert found == expected, kustomization
    ray = [c for c in CASES if "RayJob" in c.where]
    assert ray and all("trainer.backend=ray" in c.argv for c in ray)


def test_checks_reject_wrong_commands_flags_overrides_and_env(tmp_path: Path) -> None:
    with pytest.raises(CommandError):
        check_command(["hapo", "rollut"])
    with pytest.raises(CommandError):
        check_command(["hapo", "reward", "--confg", "/etc/hapo/hapo.yaml"])
    with pytest.raises(CommandError):
        check_command(["hapo", "model", "install", "--consumer", "x"])
    with pytest.raises(AssertionError):
        check_command(["python", "-m", "hapo", "reward"])
    good = next(c for c in CASES if c.argv[1] == "rollout")
    for broken in (
        Case(good.where, [*good.argv, "rollout.http_prot=1"], good.env, good.files),
        Case(good.where, [*good.argv, "rollout.http_port=-1"], good.env, good.files),
        Case(good.where, good.argv, good.env | {"HAPO_REDIS_URLL": "redis://x"}, good.files),
        Case(good.where, good.argv, good.env | {"HAPO_REDIS_URL": "http://x"}, good.files),
        Case(good.where, good.argv, good.env, {}),  # config file not mounted
    ):
        with pytest.raises((ConfigError, AssertionError)):
            check_config(broken, tmp_path)


def test_every_shipped_trainer_resumes_its_run_when_restarted(tmp_path: Path) -> None:
    """A fixed run id (a restart resumes it from its checkpoint, never a fresh run from base
    weights), checkpoints of a bounded number of runs on the shared volume; the long-lived
    trainers keep serving after their run (a restart of a finished run does not loop), the
    RayJob's ends with it (KubeRay retries a failed job: ``backoffLimit``)."""
    trainers = [case for case in CASES if case.argv[1] == "trainer"]
    assert len(trainers) == 5  # compose gpu and cpu; k8s cpu, gpu-single pods; gpu RayJob
    for case in trainers:
        trainer = check_config(case, tmp_path).trainer
        assert trainer.run_id is not None, case.where
        assert trainer.checkpoint_keep_runs is not None, case.where
        assert trainer.exit_after_run is (":RayJob/" in case.where), case.where
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("trainer", "trainer-cpu"):
        assert compose["services"][name]["restart"] == "unless-stopped"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k8s"
        shutil.copytree(REPO / "deploy/k8s", root, ignore=shutil.ignore_patterns(*SECRET_FILES))
        write_user_secrets(root)
        (rayjob,) = [o for o in render(root / "overlays/gpu") if o["kind"] == "RayJob"]
    assert rayjob["spec"]["backoffLimit"] >= 1
