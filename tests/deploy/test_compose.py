"""docker-compose.yml: valid against the Compose Specification schema (the copy vendored in
check-jsonschema, version pinned by constraints/cpu.txt), and the rules of issue #8."""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import REPO

GPU_STACK = {"rollout", "reward", "trainer"}
CPU_STACK = {"model-install", "rollout-cpu", "reward-cpu", "trainer-cpu"}


def compose_schema() -> dict[str, Any]:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def validate_compose(document: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(document)


def check_rules(compose: dict[str, Any]) -> None:
    """Deployment rules the schema cannot express; AssertionError names the broken one."""
    services = compose["services"]
    for name, service in services.items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        assert "HAPO_API_TOKEN" not in environment, f"{name}: token inline"
        for dependency in service.get("depends_on", {}).values():
            condition = dependency["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), name
        if service.get("image", "").startswith("hapo-rl:") and name != "model-install":
            assert environment["HAPO_API_HOST"] == "0.0.0.0", name
            assert environment["HAPO_REDIS_URL"] == "redis://redis:6379/0", name
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert set(services) == {"redis"} | GPU_STACK | CPU_STACK


def test_compose_file_is_valid_compose_spec(compose: dict[str, Any]) -> None:
    validate_compose(compose)


def test_compose_validator_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    for mutate in (
        lambda c: c["services"]["redis"]["healthcheck"].__setitem__("retries", ["ten"]),
        lambda c: c["services"]["rollout"].__setitem__("gpus_please", True),
        lambda c: c["services"]["reward"]["deploy"].__setitem__("replicas", {"n": 2}),
        lambda c: c["services"]["trainer"]["depends_on"]["redis"].__setitem__("condition", "up"),
    ):
        broken = copy.deepcopy(compose)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_compose(broken)


def test_compose_rules_hold(compose: dict[str, Any]) -> None:
    check_rules(compose)


def test_compose_rules_catch_an_inline_token(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["trainer"]["environment"]["HAPO_API_TOKEN"] = "hunter2"
    with pytest.raises(AssertionError, match="token inline"):
        check_rules(broken)


def redis_server_words(redis: dict[str, Any]) -> list[str]:
    """The ``redis-server`` command line in the Redis service's start script."""
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    (line,) = [line for line in script.splitlines() if line.startswith("exec redis-server")]
    return line.split()


def test_redis_appends_to_a_named_volume_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis_server_words(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    # Bounded: past maxmemory writes fail, stream entries are never evicted.
    assert command[command.index("--maxmemory") + 1] == "2gb"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    (volume,) = redis["volumes"]
    name, path = volume.split(":")
    assert name in compose["volumes"] and path == command[command.index("--dir") + 1]
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "profiles" not in redis  # shared by both stacks


def test_redis_requires_the_password_every_client_gets_from_a_git_ignored_file(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    password_file = {"path": "deploy/compose/redis-password.env", "required": True}
    for name, service in services.items():
        if name != "model-install":  # the only one that never reaches Redis
            assert password_file in service["env_file"], name
    redis = services["redis"]
    script = redis["command"][2]
    # On stdin ("redis-server -"), not on a command line that ps shows; "$$" is compose's
    # escape of "$", so the container's shell expands it, not compose.
    assert redis_server_words(redis)[:3] == ["exec", "redis-server", "-"]
    assert 'requirepass "$$HAPO_REDIS_PASSWORD"' in script
    assert script.startswith('test -n "$${HAPO_REDIS_PASSWORD:-}" || {')  # none: no start
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL"
    assert 'REDISCLI_AUTH="$$HAPO_REDIS_PASSWORD"' in redis["healthcheck"]["test"][1]
    ignored = (REPO / "deploy" / ".gitignore").read_text().split()
    assert "/compose/redis-password.env" in ignored
    example = (REPO / "deploy/compose/redis-password.env.example").read_text()
    assert "\nHAPO_REDIS_PASSWORD=\n" in example


def test_profiles_split_gpu_and_cpu_stacks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in GPU_STACK:
        assert services[name]["profiles"] == ["gpu"]
    for name in CPU_STACK:
        assert services[name]["profiles"] == ["cpu"]
        assert services[name]["image"].endswith("-cpu")
        assert "reservations" not in services[name].get("deploy", {}).get("resources", {})
    for name in ("rollout", "trainer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and services[name]["image"].endswith("-cuda")
    ids = [
        services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for n in ("rollout", "trainer")
    ]
    assert ids[0] != ids[1]  # count: 1 would hand both the first GPU
    assert services["reward"]["deploy"]["replicas"] == 2
    assert services["reward-cpu"]["deploy"]["replicas"] == 2
    assert services["trainer"]["command"][0] == services["trainer-cpu"]["command"][0] == "trainer"
    for name in ("rollout-cpu", "reward-cpu", "trainer-cpu"):  # same DNS names as gpu
        assert services[name]["networks"]["default"]["aliases"] == [name.removesuffix("-cpu")]
        assert services[name]["depends_on"]["model-install"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["model-install"]["command"] == ["model", "install"]


def test_token_comes_from_the_git_ignored_env_file(compose: dict[str, Any]) -> None:
    for name in ("rollout", "trainer", "rollout-cpu", "trainer-cpu"):
        token_file = {"path": "deploy/compose/api-token.env", "required": True}
        assert token_file in compose["services"][name]["env_file"], name
    ignored = (REPO / "deploy" / ".gitignore").read_text().split()
    assert "/compose/api-token.env" in ignored


def test_checkpoints_and_model_are_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("trainer", "trainer-cpu"):
        assert "runs:/var/lib/hapo/runs" in services[name]["volumes"]
    for name in ("rollout", "reward", "trainer"):
        assert "${MODEL_DIR:-./models/model}:/models/model:ro" in services[name]["volumes"]
        assert services[name]["environment"]["HAPO_MODEL_PATH"] == "/models/model"
    for name in CPU_STACK:
        assert "model-cache:/var/lib/hapo/cache" in services[name]["volumes"]
        assert "HAPO_MODEL_PATH" not in services[name].get("environment", {})
