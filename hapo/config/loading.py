"""Building a ``HapoConfig`` from its sources: defaults < YAML file < ``HAPO_*`` environment
variables < dotted ``key=value`` overrides; errors name the key (``hapo.config``)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hapo.config.schema import ENV_PREFIX, MASK, ConfigError, HapoConfig, env_var_name, mask_url


def iter_keys(model: type[BaseModel] = HapoConfig, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Every dotted key of the tree as ``(key, is_leaf)``, sections before their fields."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield key, False
            yield from iter_keys(annotation, f"{key}.")
        else:
            yield key, True


def _suggest(key: str) -> str:
    known = [k for k, _ in iter_keys()]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a typo in the last component: compare against siblings only
        parent = key.rpartition(".")[0]
        siblings = [k for k in known if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_value(key: str, value: str) -> Any:
    """A command-line or environment value: lists and maps (``[a, b]``, ``{k: v}``) are
    parsed as YAML; everything else stays a string for pydantic to convert, so a token of
    digits stays a string."""
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {value!r} as a list or map: {exc}") from None


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    by_env = {env_var_name(key): key for key, leaf in iter_keys() if leaf}
    layer: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "HAPO_CONFIG":
            continue
        if name not in by_env:
            close = difflib.get_close_matches(name, list(by_env), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown environment variable {name}{hint}")
        _set_dotted(layer, by_env[name], _parse_value(name, value))
    return layer


def _override_layer(overrides: Sequence[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{override}' is not of the form key=value")
        _set_dotted(layer, key.strip(), _parse_value(key.strip(), value))
    return layer


_SECRET_KEYS = {"api.token", "redis.password"}
"""Keys whose bad values an error never repeats."""


def _shown_input(key: str, value: Any) -> str:
    if any(secret == key or secret.startswith(f"{key}.") for secret in _SECRET_KEYS):
        return MASK  # the secret itself, or a section holding it
    if key == "redis":
        return MASK
    if key == "redis.url" and isinstance(value, str):
        return repr(mask_url(value))
    return repr(value)


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_suggest(key)}")
        elif key:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {_shown_input(key, item.get('input'))})")
        else:
            lines.append(item["msg"].removeprefix("Value error, "))
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> HapoConfig:
    """Build and validate the config from a YAML file, the environment and overrides.

    Args:
        config_file: optional YAML file in the verl layout.
        overrides: ``key=value`` strings (``actor_rollout_ref.rollout.n=16``).
        environ: environment to read ``HAPO_*`` variables from; ``os.environ`` by default.

    Raises:
        ConfigError: unreadable file, unknown key or environment variable, or bad value.
    """
    tree: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping, not {type(loaded).__name__}"
            )
        tree = loaded or {}
    tree = _merge(tree, _env_layer(os.environ if environ is None else environ))
    tree = _merge(tree, _override_layer(overrides))
    try:
        return HapoConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
