"""Step metrics averaged over micro-batches (and over data-parallel ranks)."""

from __future__ import annotations

import torch


class MetricMeans:
    """Weighted means of scalar metric tensors, read out once (one device sync at the end)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor, weight: torch.Tensor) -> None:
        value, weight = value.detach().double(), weight.detach().double()
        self._sums[name] = self._sums.get(name, 0.0) + value * weight
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {
            name: (total / self._weights[name].clamp_min(1e-12)).item()
            for name, total in self._sums.items()
        }
