"""HAPO's adaptive temperature as a vLLM V1 logits processor (HAPO part 1).

Each request opts in through ``SamplingParams(extra_args={"hapo": {...}})`` (see
``hapo.transport.messages.AdaptiveTemperature``) and carries its own ``norm_entropys``, so
the statistics change with every training step without restarting the engine, and a batch can mix
adaptive and plain requests with different ``tau``.

vLLM applies non-argmax-invariant processors to the raw fp32 logits *before* its own
temperature division, so dividing row ``i`` by ``1 + h_hat_i * tau_i`` here makes the
sampler use ``T_dyn = T * (1 + h_hat * tau)``, the temperature of
``hapo.algorithm.compute_entropy_based_temperature``, whose math this module calls rather
than repeats. ``logprobs_mode="processed_logprobs"`` then reports log-probs under
``T_dyn``. The processor declares itself not argmax-invariant because vLLM applies
argmax-invariant processors after the temperature division, where the entropy would be
that of ``logits / T`` instead of the raw logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from hapo.algorithm import compute_entropy_based_temperature
from hapo.transport.messages import AdaptiveTemperature

if TYPE_CHECKING:
    from vllm.config import VllmConfig

EXTRA_ARGS_KEY = "hapo"
# Key of vLLM's ``additional_config`` that switches the compiled entropy pass off.
COMPILE_KEY = "hapo_compile_entropy"


def to_extra_args(settings: AdaptiveTemperature) -> dict[str, Any]:
    """``SamplingParams.extra_args`` that carry ``settings`` to the processor."""
    return {EXTRA_ARGS_KEY: settings.model_dump()}


def parse_args(params: SamplingParams) -> AdaptiveTemperature | None:
    """The request's settings, or None when it does not use the adaptive temperature.

    Raises:
        ValueError: malformed settings, naming the field (vLLM turns it into HTTP 400).
    """
    raw = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if raw is None:
        return None
    try:
        args = AdaptiveTemperature.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"extra_args.{EXTRA_ARGS_KEY}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors()
        )
        raise ValueError(problems) from None
    greedy = params.temperature < 1e-5
    if not args.adaptive_temperature or args.norm_entropys is None or greedy:
        return None
    return args


def temperature_factor(
    logits: torch.Tensor, row_stats: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """``1 + h_hat * tau`` of each row, 1 for inactive rows.

    Args:
        logits: ``[N, V]`` fp32 logits.
        row_stats: ``[5, N]``: tau, pivot, std, scale_pos, scale_neg of each row.
        active: ``[N]`` bool.

    Returns:
        ``[N]`` fp32 factors.
    """
    tau, *norm_entropys = row_stats.unbind(0)
    ones = torch.ones_like(tau)
    factor = compute_entropy_based_temperature(logits, ones, True, tau, tuple(norm_entropys))
    return torch.where(active, factor, ones)


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """Divides each opted-in row of the logits by its ``1 + h_hat * tau``.

    The per-row entropy is one compiled pass over the logits (``torch.compile``, once
    per engine), instead of the several eager passes of a softmax formulation.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        max_rows = vllm_config.scheduler_config.max_num_seqs
        self._settings: dict[int, AdaptiveTemperature] = {}
        self._row_stats_cpu = torch.zeros((5, max_rows), dtype=torch.float32)
        self._active_cpu = torch.zeros(max_rows, dtype=torch.bool)
        self._device = device
        self._row_stats = self._row_stats_cpu.to(device)
        self._active = self._active_cpu.to(device)
        self._batch_size = 0
        compiled = vllm_config.additional_config.get(COMPILE_KEY, True)
        self._factor = (
            torch.compile(temperature_factor, dynamic=True) if compiled else temperature_factor
        )

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_args(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # see the module docstring: it must see the logits before temperature

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._settings.pop(index, None)
        for index, params, _, _ in batch_update.added:
            args = parse_args(params)
            if args is None:
                self._settings.pop(index, None)
            else:
                self._settings[index] = args
        for source, target, direction in batch_update.moved:
            moving = self._settings.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                displaced = self._settings.pop(target, None)
                if displaced is not None:
                    self._settings[source] = displaced
            else:
                self._settings.pop(target, None)
            if moving is not None:
                self._settings[target] = moving
        self._batch_size = batch_update.batch_size
        self._active_cpu.zero_()
        for index, args in self._settings.items():
            self._active_cpu[index] = True
            self._row_stats_cpu[:, index] = torch.tensor(
                [args.temperature_tau, *args.norm_entropys]  # type: ignore[misc]
            )
        self._row_stats.copy_(self._row_stats_cpu, non_blocking=True)
        self._active.copy_(self._active_cpu, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._settings:
            return logits
        rows = logits.shape[0]
        factor = self._factor(logits, self._row_stats[:, :rows], self._active[:rows])
        return logits.div_(factor.unsqueeze(-1))
