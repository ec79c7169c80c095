"""The one configuration tree of HAPO-RL.

Sources, later ones winning: field defaults < YAML file < ``HAPO_*`` environment variables
< dotted ``key=value`` command-line overrides. Keys follow the reference's verl layout
(``actor_rollout_ref.rollout.temperature_tau``, ``algorithm.adv_estimator``, ...), so its
YAML files and launch-script overrides carry over. Every leaf ``a.b.c`` can also be set by
the environment variable ``HAPO_A_B_C`` (``HAPO_REDIS_URL``, ``HAPO_API_TOKEN``, ...).

Unknown keys and bad values raise ``ConfigError`` naming the key and, for unknown keys,
the closest valid one.
"""

from hapo.config.loading import iter_keys, load_config
from hapo.config.schema import (
    ENV_PREFIX,
    MAKE_API_TOKEN,
    MASK,
    MIN_API_TOKEN_CHARS,
    RUN_ID_PATTERN,
    ActorConfig,
    ActorRolloutRefConfig,
    AlgorithmConfig,
    ApiConfig,
    ConfigError,
    DataConfig,
    HapoConfig,
    ModelConfig,
    OptimConfig,
    OverlongBufferConfig,
    RedisConfig,
    RewardConfig,
    RolloutConfig,
    RolloutCorrectionConfig,
    RolloutServiceConfig,
    RuntimeConfig,
    TrainerConfig,
    env_var_name,
    mask_url,
    new_api_token,
    require_api_token,
)

__all__ = [
    "ENV_PREFIX",
    "MAKE_API_TOKEN",
    "MASK",
    "MIN_API_TOKEN_CHARS",
    "RUN_ID_PATTERN",
    "ActorConfig",
    "ActorRolloutRefConfig",
    "AlgorithmConfig",
    "ApiConfig",
    "ConfigError",
    "DataConfig",
    "HapoConfig",
    "ModelConfig",
    "OptimConfig",
    "OverlongBufferConfig",
    "RedisConfig",
    "RewardConfig",
    "RolloutConfig",
    "RolloutCorrectionConfig",
    "RolloutServiceConfig",
    "RuntimeConfig",
    "TrainerConfig",
    "env_var_name",
    "iter_keys",
    "load_config",
    "mask_url",
    "new_api_token",
    "require_api_token",
]
