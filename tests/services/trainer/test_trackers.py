"""trainer.logger: each step's metrics through TensorBoard, wandb (offline) and mlflow (file
store), read back with each tool's own reader; the run's config attached with its secrets
masked; a missing tracker package is an error at start-up naming the key and the extra."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest

from hapo.config import ConfigError, HapoConfig, load_config
from services.trainer import trackers
from services.trainer.api import serve
from services.trainer.trackers import Trackers, check_available, numeric
from tests.helpers import wait_for
from tests.services.trainer.conftest import TOKEN, ScoredFeeder, TrainerServer

SECRET = "s3cret-token-of-many-chars"


def _config(logger: str, tmp_path: Path) -> HapoConfig:
    return load_config(
        overrides=[
            f"trainer.logger={logger}", f"trainer.run_dir={tmp_path}", f"api.token={SECRET}",
            "redis.url=redis://user:hunter2-password@127.0.0.1:6379/0", "trainer.total_steps=7",
        ],
        environ={},
    )  # fmt: skip


def _lines() -> list[dict[str, Any]]:
    """Three steps' metrics lines, shaped like ``TrainerService._record``'s."""
    return [
        {
            "step": step,
            "time": 1.7e9 + step,
            "policy_version": step,
            "reward/mean": 0.25 * step,
            "entropy/mean": 1.5 - 0.1 * step,
            "perf/tokens_per_s": 100.0 * step,
            "data/duplicates": 0,
            "data/group_ids": [f"{step:08d}"],
            "flag": True,
        }
        for step in (1, 2, 3)
    ]


def _write(config: HapoConfig, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run-a"
    run = Trackers(config, "run-a", run_dir)
    run.open()
    for line in _lines():
        run.log(line)
    run.close()
    return run_dir


def _check_config(config: dict[str, Any]) -> None:
    assert config["trainer"]["total_steps"] == 7
    assert config["api"]["token"] == "**********"
    assert "hunter2" not in config["redis"]["url"]
    assert SECRET not in json.dumps(config)


def test_only_numbers_go_to_trackers() -> None:
    metrics = numeric(_lines()[0])
    assert metrics == {
        "policy_version": 1.0, "reward/mean": 0.25, "entropy/mean": 1.4,
        "perf/tokens_per_s": 100.0, "data/duplicates": 0.0,
    }  # fmt: skip


def test_console_logs_the_step_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hapo.trainer"):
        _write(_config("[console]", tmp_path), tmp_path)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps[-1] == "step 3: reward 0.750, entropy 1.200, 300 tokens/s"
    assert len(steps) == 3
    with caplog.at_level(logging.INFO, logger="hapo.trainer"):
        caplog.clear()
        _write(_config("[tensorboard]", tmp_path / "quiet"), tmp_path / "quiet")
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _write(_config("[tensorboard]", tmp_path), tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert rewards == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in events.Scalars("perf/tokens_per_s")] == [100.0, 200.0, 300.0]
    assert "data/group_ids" not in events.Tags()["scalars"]
    assert "flag" not in events.Tags()["scalars"]
    (text,) = events.Tensors("config/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    _check_config(json.loads(markdown.removeprefix("```json\n").removesuffix("\n```")))


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline wandb run file (LevelDB log format: a 7-byte file header,
    32 KiB blocks of chunks, each chunk a crc32c, a length and a type)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, pos = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _write(_config("[wandb]", tmp_path), tmp_path)
    (path,) = (run_dir / "wandb").glob("offline-run-*-run-a/run-run-a.wandb")
    records = _wandb_records(path)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
    kinds = [record.WhichOneof("record_type") for record in records]
    assert sorted(history) == [1, 2, 3], kinds
    assert [history[s]["reward/mean"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert history[3]["perf/tokens_per_s"] == 300.0 and "data/group_ids" not in history[3]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == "run-a"
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    _check_config(config)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # closed


def test_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config("[mlflow]", tmp_path)
    run_dir = _write(config, tmp_path)
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hapo-rl").experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert run.data.params["trainer.total_steps"] == "7"
    assert run.data.params["api.token"] == "**********"
    assert SECRET not in json.dumps(run.data.params)
    (tmp_path / "download").mkdir()
    saved = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "download"))
    _check_config(json.loads(Path(saved).read_text()))
    # The run resumed under its id continues the same mlflow run.
    again = Trackers(config, "run-a", run_dir)
    again.open()
    again.log({"step": 4, "reward/mean": 1.0})
    again.close()
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert client.get_metric_history(run.info.run_id, "reward/mean")[-1].step == 4


def test_a_missing_package_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(trackers._PACKAGES, "wandb", "hapo_no_such_package")
    check_available(["console", "tensorboard"])  # installed: fine
    config = _config("[console, wandb]", tmp_path)
    message = (
        r"trainer\.logger: wandb selected but not installed; "
        r"run pip install 'hapo-rl\[trackers\]'"
    )
    with pytest.raises(ConfigError, match=message):
        Trackers(config, "run-a", tmp_path / "run-a")
    with pytest.raises(SystemExit, match=message):  # `hapo trainer` exits before serving
        asyncio.run(serve(config, asyncio.Event(), start_run=True))
    assert not (tmp_path / "run-a").exists()  # nothing written


def test_a_run_writes_its_steps_to_tensorboard(
    trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["trainer.run_id=tb", "trainer.total_steps=2", "trainer.logger=[tensorboard]"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
    assert status == 201, body
    run = lambda: trainer_api.request("GET", "/v1/runs/tb")[1]  # noqa: E731
    wait_for(lambda: run()["state"] in ("finished", "failed"), 120, "the run to end")
    assert run()["state"] == "finished", run()["error"]
    lines = (tmp_path / "runs" / "tb" / "metrics.jsonl").read_text().splitlines()
    expected = [json.loads(line)["reward/mean"] for line in lines]
    events = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx(expected)
    assert {"loss/clipfrac_high_entropy", "staleness/mean"} <= set(events.Tags()["scalars"])


def test_starting_a_run_with_a_missing_tracker_is_a_422(
    trainer_api: TrainerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(trackers._PACKAGES, "mlflow", "hapo_no_such_package")
    body = {"overrides": ["trainer.logger=[mlflow]"]}
    status, answer = trainer_api.request("POST", "/v1/runs", body, token=TOKEN)
    assert status == 422
    assert "trainer.logger: mlflow selected but not installed" in answer["detail"][0]["msg"]
