"""Experiment trackers: where each step's metrics go besides ``metrics.jsonl``
(``trainer.logger``, verl's key: any of ``console``, ``tensorboard``, ``wandb``, ``mlflow``).

Every tracker gets the numeric values of the step's metrics line (the dict
``TrainerService._record`` writes) at that step, and the run's config with its secrets
masked (``HapoConfig.to_json``). Files go under the run directory:

- ``tensorboard``: event files in ``<run dir>/tensorboard/`` (the config as a text summary);
- ``wandb``: ``<run dir>/wandb/`` (``WANDB_MODE=offline`` needs no network; the run id is
  the wandb run id, so a resumed run continues it online);
- ``mlflow``: a file store in ``<run dir>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` names
  another (the config as flat params and a ``config.json`` artifact).

``tensorboard``, ``wandb`` and ``mlflow`` come with ``pip install 'hapo-rl[trackers]'``; a
selected one whose package is missing is a ``ConfigError`` when the run is created
(``Trackers(...)``), before the model loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from hapo.config import ConfigError, HapoConfig

logger = logging.getLogger("hapo.trainer")

EXTRA = "pip install 'hapo-rl[trackers]'"
"""How to install the optional tracker packages."""
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each optional tracker imports."""
_NOT_METRICS = {"step", "time"}
"""Numeric fields of the metrics line that are not metrics (the step is the x axis)."""


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numeric(line: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a metrics line that trackers take: numbers, not booleans."""
    return {
        key: float(value)
        for key, value in line.items()
        if key not in _NOT_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("a.b.c", leaf)`` pairs of a nested config dict."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_available(names: list[str]) -> None:
    """Raise if a selected tracker's package is not installed.

    Raises:
        ConfigError: naming ``trainer.logger``, the tracker and the pip extra.
    """
    missing = [
        name
        for name in names
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None
    ]
    if missing:
        raise ConfigError(
            f"trainer.logger: {', '.join(missing)} selected but not installed; "
            f"run {EXTRA} or remove {'it' if len(missing) == 1 else 'them'} from trainer.logger"
        )


class ConsoleTracker:
    """The trainer's log line per step (reward, entropy, tokens/s)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        logger.info(
            "step %d: reward %.3f, entropy %.3f, %.0f tokens/s", step,
            metrics.get("reward/mean", math.nan), metrics.get("entropy/mean", math.nan),
            metrics.get("perf/tokens_per_s", math.nan),
        )  # fmt: skip

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars in ``<run dir>/tensorboard/``; the config as the text summary ``config``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run under ``<run dir>/wandb/`` with the run id as its id (resumed with the
    run); ``WANDB_MODE``, ``WANDB_PROJECT`` (default ``hapo-rl``) and ``WANDB_ENTITY``
    apply as usual."""

    def __init__(self, run_id: str, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "hapo-rl"), id=run_id,
            name=run_id, config=dict(config), resume="allow",
            settings=wandb.Settings(console="off"),  # the trainer's own logs stay as they are
        )  # fmt: skip

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits until wandb's service has written (or sent) everything


class MlflowTracker:
    """An mlflow run named after the run (the same one again when the run resumes): the
    config as flat params and ``config.json``. The tracking URI is ``MLFLOW_TRACKING_URI``,
    else a file store in ``<run dir>/mlruns``; the experiment ``MLFLOW_EXPERIMENT_NAME``,
    else ``hapo-rl``."""

    def __init__(self, run_id: str, run_dir: Path, config: Mapping[str, Any]) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # mlflow 3 wants this opt-in for its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hapo-rl")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        runs = self.client.search_runs(
            [experiment_id], f"tags.`hapo.run_id` = '{run_id}'", max_results=1
        )
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=run_id, tags={"hapo.run_id": run_id})
        self.run_id = run.info.run_id
        params = [
            Param(key, (value if isinstance(value, str) else json.dumps(value))[:6000])
            for key, value in flatten(config)
        ]
        for start in range(0, len(params), 100):  # mlflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self.Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers of ``trainer.logger`` for one run.

    Created with the run (checks that their packages are installed), ``open`` before the
    first step, ``log`` per step, ``close`` when the run ends."""

    def __init__(self, config: HapoConfig, run_id: str, run_dir: Path) -> None:
        check_available(config.trainer.logger)
        self.names = list(dict.fromkeys(config.trainer.logger))
        self.run_id, self.run_dir = run_id, run_dir
        self.config: dict[str, Any] = json.loads(config.to_json())  # secrets masked
        self.opened: list[Tracker] = []

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            if name == "console":
                self.opened.append(ConsoleTracker())
            elif name == "tensorboard":
                self.opened.append(TensorBoardTracker(self.run_dir, self.config))
            elif name == "wandb":
                self.opened.append(WandbTracker(self.run_id, self.run_dir, self.config))
            elif name == "mlflow":
                self.opened.append(MlflowTracker(self.run_id, self.run_dir, self.config))

    def log(self, line: Mapping[str, Any]) -> None:
        """Send a metrics line's numbers to every tracker at its ``step``."""
        metrics, step = numeric(line), int(line["step"])
        for tracker in list(self.opened):
            try:
                tracker.log(metrics, step)
            except Exception:  # metrics.jsonl has the step: training goes on without it
                logger.exception("the %s tracker failed; closing it", type(tracker).__name__)
                self.opened.remove(tracker)
                self._close(tracker)

    def close(self) -> None:
        """Close every opened tracker (one failing does not keep the others open)."""
        opened, self.opened = self.opened, []
        for tracker in opened:
            self._close(tracker)

    @staticmethod
    def _close(tracker: Tracker) -> None:
        try:
            tracker.close()
        except Exception:
            logger.exception("closing the %s tracker failed", type(tracker).__name__)
