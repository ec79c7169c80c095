"""The trainer's Prometheus metrics (its own registry: no global state)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

H_HAT_BUCKETS = (-1.0, -0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
"""Upper bounds of the ``h_hat`` histogram (``h_hat`` lies in ``[-1, 1]``)."""


class TensorHistogram(Collector):
    """A Prometheus histogram fed a whole tensor at once (a step has ~10^4-10^7 tokens:
    one ``observe`` call per token would cost more than the step's bookkeeping).

    With negative bucket bounds the exposition format has no ``_sum``/``_count``: the
    ``+Inf`` bucket is the count."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = torch.tensor(buckets, dtype=torch.float64)
        self.cumulative = [0] * len(buckets)
        self.count = 0

    def observe(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        values = values[torch.isfinite(values)]
        below = (values.unsqueeze(0) <= self.bounds.unsqueeze(1)).sum(dim=1)
        self.cumulative = [total + int(n) for total, n in zip(self.cumulative, below, strict=True)]
        self.count += values.numel()

    def collect(self) -> Iterator[Metric]:
        bounds = [(repr(float(b)), n) for b, n in zip(self.bounds, self.cumulative, strict=True)]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=[*bounds, ("+Inf", self.count)]
        )


def h_hat_summary(h_hat: torch.Tensor | None) -> dict[str, float]:
    """Mean and 10/50/90th percentiles of a step's token ``h_hat``, for its JSONL line."""
    if h_hat is None or not h_hat.numel():
        return {}
    values = h_hat.float()
    p10, p50, p90 = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {
        "entropy/h_hat_mean": values.mean().item(),
        "entropy/h_hat_p10": p10, "entropy/h_hat_p50": p50, "entropy/h_hat_p90": p90,
    }  # fmt: skip


@dataclass
class TrainerMetrics:
    """Gauges of the last step, histograms over steps, counters of runs."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        registry = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"hapo_trainer_{name}", doc, labels, registry=registry)

        self.step = gauge("step", "Training steps completed in the current run")
        self.policy_version = gauge("policy_version", "Policy version of the learner's weights")
        self.steps = Counter("hapo_trainer_steps", "Training steps completed", registry=registry)
        self.runs = Counter(
            "hapo_trainer_runs", "Runs ended, by final state", ["state"], registry=registry
        )
        self.step_seconds = Histogram(
            "hapo_trainer_step_seconds", "Learner step time (old log-probs + PPO epochs)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=registry,
        )  # fmt: skip
        self.weight_sync_seconds = Histogram(
            "hapo_trainer_weight_sync_seconds", "Pushing the weights to every rollout replica",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=registry,
        )  # fmt: skip
        self.tokens_per_second = gauge("tokens_per_second", "Learner tokens/s of the last step")
        self.reward = gauge("reward", "Sequence reward of the last step's batch", ("stat",))
        self.advantage = gauge("advantage", "Token advantages of the last step", ("stat",))
        self.response_length = gauge(
            "response_length_tokens", "Response lengths of the last step", ("stat",)
        )
        self.entropy = gauge("entropy", "Mean token entropy (nats) of the last step")
        self.clip_fraction = gauge(
            "clip_fraction",
            "Share of tokens clipped in the last step; entropy=high: h_hat > 0, low: h_hat <= 0",
            ("entropy",),
        )
        self.clip_bound = gauge(
            "clip_bound_mean", "Mean adaptive clip range of the last step", ("side",)
        )
        self.staleness = gauge(
            "staleness", "Policy versions between sampling and training, last step", ("stat",)
        )
        self.duplicates = gauge("duplicates", "Redelivered samples dropped in the current run")
        self.abandoned_groups = gauge(
            "abandoned_groups",
            "Prompt groups of the current run abandoned, incomplete past trainer.group_timeout_s",
        )
        self.h_hat = TensorHistogram(
            "hapo_trainer_h_hat", "Normalised token entropy h_hat of trained tokens", H_HAT_BUCKETS
        )
        registry.register(self.h_hat)

    def record_step(self, line: Mapping[str, float], h_hat: torch.Tensor | None) -> None:
        """Update from one step's JSONL record (``TrainerService`` writes it) and its
        tokens' ``h_hat``."""

        def set_(gauge: Gauge, key: str) -> None:
            value = line.get(key)
            if value is not None and math.isfinite(value):
                gauge.set(value)

        self.steps.inc()
        set_(self.step, "step")
        set_(self.policy_version, "policy_version")
        self.step_seconds.observe(line["perf/step_s"])
        self.weight_sync_seconds.observe(line["perf/weight_sync_s"])
        set_(self.tokens_per_second, "perf/tokens_per_s")
        for stat in ("mean", "std"):
            set_(self.reward.labels(stat), f"reward/{stat}")
            set_(self.advantage.labels(stat), f"reward/advantage_{stat}")
        for stat in ("mean", "max"):
            set_(self.response_length.labels(stat), f"reward/response_length_{stat}")
            set_(self.staleness.labels(stat), f"staleness/{stat}")
        set_(self.entropy, "entropy/mean")
        set_(self.clip_fraction.labels("all"), "loss/clipfrac")
        set_(self.clip_fraction.labels("high"), "loss/clipfrac_high_entropy")
        set_(self.clip_fraction.labels("low"), "loss/clipfrac_low_entropy")
        set_(self.clip_bound.labels("low"), "loss/clip_low_mean")
        set_(self.clip_bound.labels("high"), "loss/clip_high_mean")
        set_(self.duplicates, "data/duplicates")
        set_(self.abandoned_groups, "data/abandoned_groups")
        if h_hat is not None:
            self.h_hat.observe(h_hat)
