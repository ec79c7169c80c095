"""A run's config: the process's config with the run's overrides."""

from __future__ import annotations

import pytest

from hapo.config import ConfigError, load_config
from services.trainer.runs import config_with_overrides

PASSWORD = "a-redis-password-0123"
TOKEN = "an-api-token-of-24-chars"


def test_overrides_apply_and_the_secrets_stay_the_processs() -> None:
    base = load_config(environ={"HAPO_REDIS_PASSWORD": PASSWORD, "HAPO_API_TOKEN": TOKEN})
    config = config_with_overrides(base, ["trainer.total_steps=7", "redis.stream_prefix=other"])
    assert config.trainer.total_steps == 7 and config.redis.stream_prefix == "other"
    # A dump masks secrets: the run must get the real ones back, not "**********".
    assert config.redis.password is not None and config.api.token is not None
    assert config.redis.password.get_secret_value() == PASSWORD
    assert config.api.token.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("override", "key"),
    [("redis.password=x", "redis.password"), ("api.token=y", "api.token"), ("api.port=1", "api")],
)
def test_a_run_cannot_override_the_processs_secrets(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_with_overrides(load_config(environ={}), [override])
