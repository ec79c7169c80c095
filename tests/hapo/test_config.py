"""The config tree: sources, precedence, validation messages, secrets."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from hapo.algorithm import ROLLOUT_CORRECTION_MODES
from hapo.config import (
    MAKE_API_TOKEN,
    ConfigError,
    HapoConfig,
    RolloutCorrectionConfig,
    env_var_name,
    iter_keys,
    load_config,
    mask_url,
    new_api_token,
    require_api_token,
)

TOKEN = "t0k-of-sixteen-chars"

SEED_EXAMPLE = """
actor_rollout_ref::
  rollout:
    adaptive_temperature: True
    temperature_tau: 0.05
"""

VERL_LAYOUT = """
actor_rollout_ref:
  rollout: {adaptive_temperature: false, temperature_tau: 0.02, n: 16}
  actor:
    adaptive_clip: true
    clip_alpha: 0.5
    optim: {lr: 2.0e-6}
algorithm: {adv_estimator: grpo}
data: {train_batch_size: 16}
reward:
  overlong_buffer: {enable: true, len: 8, penalty_factor: 0.5}
"""


def _sections_and_fields(model: type[BaseModel] = HapoConfig):
    for name, field in model.model_fields.items():
        yield model, name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _sections_and_fields(field.annotation)


def test_defaults_are_valid_and_reference_hyperparameters() -> None:
    config = load_config(environ={})
    actor = config.actor_rollout_ref.actor
    assert config.actor_rollout_ref.rollout.temperature_tau == 0.05
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.entropy_pivot) == (0.2, 0.2, 0.8)
    assert (actor.clip_alpha, actor.adv_beta, actor.clip_ratio_c) == (1.0, 1.0, 10.0)
    assert config.algorithm.adv_estimator == "hapo"
    assert not config.reward.overlong_buffer.enable


def test_every_field_is_documented_and_numbers_are_bounded() -> None:
    for model, name, field in _sections_and_fields():
        assert field.description, f"{model.__name__}.{name} has no docstring"
        if field.annotation in (int, float):
            bounds = [m for m in field.metadata if type(m).__name__ in {"Ge", "Gt", "Le", "Lt"}]
            assert bounds, f"{model.__name__}.{name} has no bounds"


def test_yaml_in_verl_layout(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(VERL_LAYOUT)
    config = load_config(path, environ={})
    assert config.actor_rollout_ref.rollout.n == 16
    assert not config.actor_rollout_ref.rollout.adaptive_temperature
    assert config.actor_rollout_ref.actor.optim.lr == 2e-6
    assert config.actor_rollout_ref.actor.clip_alpha == 0.5
    assert config.algorithm.adv_estimator == "grpo"
    assert config.reward.overlong_buffer.len == 8


def test_seed_example_typo_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED_EXAMPLE)
    with pytest.raises(ConfigError, match=r"unknown key 'actor_rollout_ref:'.*'actor_rollout_ref'"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.rollout.temprature_tau=0.1", "did you mean 'actor_rollout_ref.rollout.temperature_tau'"),
        ("actor_rollout_ref.rollout.temperature_tau=1.5", "actor_rollout_ref.rollout.temperature_tau: Input should be less than 1"),
        ("actor_rollout_ref.actor.clip_ratio_c=1", "actor_rollout_ref.actor.clip_ratio_c: Input should be greater than 1"),
        ("algorithm.adv_estimator=ppo", "algorithm.adv_estimator: Input should be 'hapo' or 'grpo'"),
        ("data.train_batch_size=many", "data.train_batch_size: Input should be a valid integer"),
        ("actor_rollout_ref.actor.ppo_mini_batch_size=3", "ppo_mini_batch_size \\(3\\) must divide data.train_batch_size"),
        ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=7", "ppo_micro_batch_size_per_gpu \\(7\\) must divide"),
        ("redis.url=http://localhost", "redis.url: String should match pattern"),
        ("rollout.max_deliveries=0", "rollout.max_deliveries: Input should be greater than or equal to 1"),
        ("reward.max_deliveries=0", "reward.max_deliveries: Input should be greater than or equal to 1"),
        ("trainer.max_deliveries=0", "trainer.max_deliveries: Input should be greater than or equal to 1"),
        ("actor_rollout_ref.rollout.n=128", "rollout.max_n \\(64\\) must be at least actor_rollout_ref.rollout.n \\(128\\)"),
        ("data.max_response_length=2000", "data.max_response_length \\(2000\\) must not exceed rollout.max_model_len \\(1024\\)"),
        ("redis.dead_maxlen=0", "redis.dead_maxlen: Input should be greater than or equal to 1"),
        ("seed.x=1", "seed: Input should be a valid integer"),
        ("no_equals_sign", "not of the form key=value"),
    ],
)  # fmt: skip
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override], environ={})


def test_override_below_a_value() -> None:
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(overrides=["seed=1", "seed.x=2"], environ={})


def test_overlong_buffer_must_fit_the_response() -> None:
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer\.len"):
        load_config(
            overrides=["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=64"],
            environ={},
        )


def test_rollout_correction_keys() -> None:
    correction = load_config(environ={}).algorithm.rollout_correction
    assert correction.mode == "token_tis" and correction.rollout_is_threshold == 2.0
    assert (correction.rollout_rs_threshold, correction.rollout_rs_threshold_lower) == (2.0, None)
    assert not correction.recompute_at_sampling_temperature
    assert typing.get_args(RolloutCorrectionConfig.model_fields["mode"].annotation) == (
        ROLLOUT_CORRECTION_MODES
    )
    prefix = "algorithm.rollout_correction"
    config = load_config(
        overrides=[f"{prefix}.mode=geo_mask", f"{prefix}.rollout_rs_threshold=1.001"],
        environ={"HAPO_ALGORITHM_ROLLOUT_CORRECTION_ROLLOUT_RS_THRESHOLD_LOWER": "0.999"},
    )
    assert config.algorithm.rollout_correction.mode == "geo_mask"
    assert config.algorithm.rollout_correction.rollout_rs_threshold_lower == 0.999


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=on"], r"algorithm\.rollout_correction\.mode: Input should be 'off', 'token_tis'"),
        (["mdoe=off"], r"unknown key 'algorithm\.rollout_correction\.mdoe'; did you mean 'algorithm\.rollout_correction\.mode'"),
        (["rollout_is_threshold=1"], r"algorithm\.rollout_correction\.rollout_is_threshold: Input should be greater than 1"),
        (["rollout_rs_threshold_lower=0"], r"algorithm\.rollout_correction\.rollout_rs_threshold_lower: Input should be greater than 0"),
        (["rollout_rs_threshold=1"], r"algorithm\.rollout_correction: rollout_rs_threshold_lower \(1\.0; unset: 1 / rollout_rs_threshold\) must be below rollout_rs_threshold \(1\.0\)"),
        (["rollout_rs_threshold=1", "rollout_rs_threshold_lower=1"], r"algorithm\.rollout_correction: rollout_rs_threshold_lower \(1\.0"),
        (["recompute_at_sampling_temperature=maybe"], r"algorithm\.rollout_correction\.recompute_at_sampling_temperature: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_bad_rollout_correction_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"algorithm.rollout_correction.{o}" for o in overrides], environ={})


def test_precedence_file_env_override(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("actor_rollout_ref: {rollout: {temperature_tau: 0.01, top_p: 0.9}}\nseed: 1\n")
    environ = {
        "HAPO_ACTOR_ROLLOUT_REF_ROLLOUT_TEMPERATURE_TAU": "0.02",
        "HAPO_SEED": "2",
        "PATH": "/bin",
    }
    config = load_config(path, ["seed=3"], environ=environ)
    assert config.actor_rollout_ref.rollout.temperature_tau == 0.02  # env beats file
    assert config.actor_rollout_ref.rollout.top_p == 0.9  # file beats default
    assert config.seed == 3  # override beats env


def test_deployment_env_vars_and_unknown_ones() -> None:
    config = load_config(
        environ={"HAPO_REDIS_URL": "redis://redis:6379/1", "HAPO_API_TOKEN": TOKEN}
    )
    assert config.redis.url == "redis://redis:6379/1"
    assert config.api.token is not None and config.api.token.get_secret_value() == TOKEN
    with pytest.raises(ConfigError, match="HAPO_REDIS_URLL; did you mean 'HAPO_REDIS_URL'"):
        load_config(environ={"HAPO_REDIS_URLL": "redis://x"})


def test_env_var_names_are_unique() -> None:
    names = [env_var_name(key) for key, leaf in iter_keys() if leaf]
    assert len(names) == len(set(names))
    assert env_var_name("api.token") == "HAPO_API_TOKEN"


def test_secret_is_masked_when_logged() -> None:
    config = load_config(environ={"HAPO_API_TOKEN": "very-secret-token"})
    dumped = config.to_json()
    assert "very-secret-token" not in dumped
    assert json.loads(dumped)["api"]["token"] == "**********"
    assert "very-secret-token" not in repr(config)


@pytest.mark.parametrize("token", ["", "hunter2", "q" * 15])
def test_short_or_empty_token_is_refused_naming_the_key(token: str) -> None:
    for source in ({"environ": {"HAPO_API_TOKEN": token}}, {"overrides": [f"api.token={token}"]}):
        with pytest.raises(ConfigError) as error:
            load_config(**{"environ": {}, **source})
        message = str(error.value)
        assert "api.token" in message and "HAPO_API_TOKEN" in message
        assert "at least 16 characters" in message and MAKE_API_TOKEN in message
        if token:
            assert token not in message  # the bad secret is not repeated
    assert load_config(environ={"HAPO_API_TOKEN": "q" * 16}).api.token is not None


def test_services_that_need_a_token_get_a_clear_error_without_one() -> None:
    with pytest.raises(ConfigError, match=r"api\.token \(HAPO_API_TOKEN\) is not set") as error:
        require_api_token(load_config(environ={}), "hapo trainer")
    assert "hapo trainer" in str(error.value) and MAKE_API_TOKEN in str(error.value)
    token = new_api_token()  # what `hapo up` makes for its session
    config = load_config(environ={"HAPO_API_TOKEN": token})
    assert require_api_token(config, "x").get_secret_value() == token
    assert new_api_token() != token


def test_redis_password_is_masked_where_the_config_is_shown() -> None:
    url = "redis://hapo:s3cret-pw@redis:6379/0"
    config = load_config(overrides=[f"redis.url={url}"], environ={})
    shown = json.loads(config.to_json())["redis"]["url"]
    assert shown == "redis://hapo:**********@redis:6379/0"
    assert "s3cret-pw" not in repr(config)
    assert config.redis.url == url  # the service connects with the real one
    assert json.loads(config.model_dump_json())["redis"]["url"] == url  # a plain dump too
    with pytest.raises(ConfigError, match=r"redis\.url") as error:
        load_config(overrides=["redis.url=http://hapo:s3cret-pw@redis:6379"], environ={})
    assert "s3cret-pw" not in str(error.value)
    assert mask_url("unix:///run/redis.sock?db=0&password=s3cret-pw") == (
        "unix:///run/redis.sock?db=0&password=**********"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_redis_password_comes_from_the_environment_and_is_never_shown() -> None:
    secret = "redis-secret-of-24-chars"
    config = load_config(environ={"HAPO_REDIS_PASSWORD": secret})
    assert config.redis.password is not None
    assert config.redis.password.get_secret_value() == secret
    assert json.loads(config.to_json())["redis"]["password"] == "**********"
    assert secret not in config.to_json() and secret not in repr(config)
    for bad in ("", "hunter2"):
        with pytest.raises(ConfigError) as error:
            load_config(environ={"HAPO_REDIS_PASSWORD": bad})
        message = str(error.value)
        assert "redis.password" in message and "HAPO_REDIS_PASSWORD" in message
        assert "at least 16 characters" in message
        assert bad == "" or bad not in message


def test_config_is_immutable() -> None:
    config = load_config(environ={})
    with pytest.raises(Exception, match="frozen"):
        config.seed = 5  # type: ignore[misc]


def test_default_model_path_under_cache_dir(tmp_path: Path) -> None:
    config = load_config(overrides=[f"model.cache_dir={tmp_path}"], environ={})
    assert config.model.local_path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    config = load_config(overrides=[f"model.path={tmp_path}/m"], environ={})
    assert config.model.local_path == tmp_path / "m"


def test_iter_keys_covers_issue_keys() -> None:
    keys = {key for key, _ in iter_keys()}
    for key in [
        "actor_rollout_ref.rollout.adaptive_temperature", "actor_rollout_ref.rollout.temperature_tau",
        "actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.top_p",
        "actor_rollout_ref.rollout.n", "actor_rollout_ref.actor.adaptive_advantage",
        "actor_rollout_ref.actor.adv_beta", "actor_rollout_ref.actor.adaptive_clip",
        "actor_rollout_ref.actor.clip_alpha", "actor_rollout_ref.actor.clip_ratio_low",
        "actor_rollout_ref.actor.clip_ratio_high", "actor_rollout_ref.actor.clip_ratio_c",
        "actor_rollout_ref.actor.entropy_pivot", "actor_rollout_ref.actor.ppo_mini_batch_size",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_epochs",
        "actor_rollout_ref.actor.optim.lr", "algorithm.adv_estimator",
        "algorithm.norm_adv_by_std_in_grpo", "algorithm.reference_scale_neg_sign",
        "algorithm.reference_padding_fallback", "reward.overlong_buffer.enable",
        "reward.overlong_buffer.len", "reward.overlong_buffer.penalty_factor",
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length",
    ]:  # fmt: skip
        assert key in keys, key
    assert typing.get_args(HapoConfig.model_fields["algorithm"].annotation) == ()


def test_lists_from_overrides_and_environment() -> None:
    config = load_config(
        overrides=['trainer.rollout_urls=["http://a:1", "http://b:2"]'], environ={}
    )
    assert config.trainer.rollout_urls == ["http://a:1", "http://b:2"]
    config = load_config(
        environ={"HAPO_TRAINER_ROLLOUT_URLS": "[http://c:3]", "HAPO_API_TOKEN": "1" * 16}
    )
    assert config.trainer.rollout_urls == ["http://c:3"]
    assert config.api.token is not None and config.api.token.get_secret_value() == "1" * 16
    with pytest.raises(ConfigError, match=r"trainer\.rollout_urls: cannot parse"):
        load_config(overrides=["trainer.rollout_urls=[unclosed"], environ={})


def test_trainer_logger_is_a_list_of_known_trackers() -> None:
    assert load_config(environ={}).trainer.logger == ["console"]
    config = load_config(overrides=["trainer.logger=['console','tensorboard']"], environ={})
    assert config.trainer.logger == ["console", "tensorboard"]
    assert load_config(overrides=["trainer.logger=mlflow"], environ={}).trainer.logger == ["mlflow"]
    with pytest.raises(ConfigError, match=r"trainer\.logger\.1: Input should be 'console'"):
        load_config(overrides=["trainer.logger=[console, neptune]"], environ={})
