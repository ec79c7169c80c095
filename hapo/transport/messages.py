"""Wire schema of the Redis streams: one pydantic model per stream, msgpack on the wire.

Token ids and log-probs travel as little-endian binary (``<i4`` / ``<f4`` bytes inside the
msgpack map), never as lists of numbers. A message is bytes in, bytes out (``to_bytes`` /
``from_bytes``); where the bytes go in a stream entry is the transport's business
(``hapo.transport.base.Entry``).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal, Self

import msgpack
import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from hapo.config import RUN_ID_PATTERN


class MalformedMessage(ValueError):
    """A stream entry that cannot be decoded or validated; the message says why."""


def _array(dtype: str) -> Any:
    """Annotated 1-D numpy array of ``dtype``: accepts arrays, lists or raw bytes."""
    item_size = np.dtype(dtype).itemsize

    def validate(value: Any) -> np.ndarray:
        if isinstance(value, bytes | bytearray | memoryview):
            if len(value) % item_size:
                raise ValueError(f"{len(value)} bytes is not a whole number of {dtype} items")
            return np.frombuffer(value, dtype=dtype)
        array = np.asarray(value)
        if array.ndim != 1:
            raise ValueError(f"expected a 1-D array, got shape {array.shape}")
        if array.size and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise ValueError(f"cannot hold {array.dtype} values as {dtype}")
        return array.astype(dtype, copy=False)

    return Annotated[
        np.ndarray,
        BeforeValidator(validate),
        PlainSerializer(lambda array: np.ascontiguousarray(array, dtype=dtype).tobytes()),
    ]


TokenIds = _array("<i4")
LogProbs = _array("<f4")


def _check_norm_entropys(stats: tuple[float, float, float, float]) -> tuple[float, ...]:
    if not all(math.isfinite(value) for value in stats):
        raise ValueError("norm_entropys must be finite")
    if stats[1] < 0:
        raise ValueError("norm_entropys std must be >= 0")
    return stats


NormEntropysValue = Annotated[
    tuple[float, float, float, float], AfterValidator(_check_norm_entropys)
]
"""``(pivot, std, scale_pos, scale_neg)`` of a training step: finite, ``std >= 0``."""


class _Message(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    def to_bytes(self) -> bytes:
        """The message as msgpack."""
        return msgpack.packb(self.model_dump(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse a message from its msgpack bytes.

        Raises:
            MalformedMessage: bad msgpack or a schema violation; the message names the
                problem and is fit for the dead-letter stream.
        """
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise MalformedMessage(f"undecodable msgpack ({type(exc).__name__}: {exc})") from None
        if not isinstance(raw, dict):
            raise MalformedMessage(f"payload is a {type(raw).__name__}, not a map")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise MalformedMessage(f"invalid {cls.__name__}: {problems}") from None


class SampleKey(BaseModel):
    """Identity of one sample: a redelivered copy carries the same key."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    group_id: str
    sample_idx: int
    policy_version: int


class AdaptiveTemperature(BaseModel):
    """HAPO's adaptive temperature for one request (the rollout's logits processor reads
    it from ``SamplingParams.extra_args["hapo"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    adaptive_temperature: bool = True
    """Sample at ``T * (1 + h_hat * tau)`` instead of ``T``."""
    temperature_tau: float = Field(0.05, ge=0.0, lt=1.0)
    """Relative range of the adjustment."""
    norm_entropys: NormEntropysValue | None = None
    """``(pivot, std, scale_pos, scale_neg)`` of a training step; None samples at the fixed
    temperature (step 1). A rollout that received weights with their statistics uses
    those instead (docs/design.md, decision 6)."""


class SamplingSettings(BaseModel):
    """How to sample a prompt group."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Base temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass."""
    max_tokens: int = Field(64, ge=1, le=1_000_000)
    """Most new tokens per sample."""
    seed: int | None = Field(None, ge=0)
    """Seed of sample 0; sample i uses ``seed + i``. None: unseeded."""
    adaptive: AdaptiveTemperature = AdaptiveTemperature()
    """HAPO's adaptive temperature."""


class PromptGroup(_Message):
    """One prompt to sample ``n`` times (``hapo:prompts``)."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    """Training run this prompt belongs to."""
    group_id: str = Field(min_length=1, max_length=128)
    """Unique id of the prompt group within the run."""
    prompt_ids: TokenIds
    """Prompt token ids, chat template applied."""
    answer: str = Field(max_length=4096)
    """Gold answer, passed through to the reward."""
    n: int = Field(ge=1, le=1024)
    """Samples to draw."""
    policy_version: int = Field(ge=0)
    """Learner version when the prompt was queued."""
    sampling: SamplingSettings = SamplingSettings()
    """Sampling settings, ``norm_entropys`` of the last step included."""
    enqueued_at: float = Field(default_factory=time.time)
    """Unix time the prompt was queued."""


class Trajectory(_Message):
    """One finished sample (``hapo:trajectories``)."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    """Training run."""
    group_id: str = Field(min_length=1, max_length=128)
    """Prompt group."""
    sample_idx: int = Field(ge=0)
    """Index of the sample within its group, in ``[0, n)``."""
    n: int = Field(ge=1, le=1024)
    """Group size."""
    policy_version: int = Field(ge=0)
    """Policy version that started the sample."""
    policy_version_end: int = Field(ge=0)
    """Policy version that finished it (higher when weights changed mid-sample)."""
    prompt_ids: TokenIds
    """Prompt token ids."""
    response_ids: TokenIds
    """Generated token ids."""
    logprobs: LogProbs
    """Behaviour log-prob of each generated token (after the adaptive temperature)."""
    finish_reason: Literal["stop", "length", "abort"]
    """Why generation ended."""
    answer: str = Field(max_length=4096)
    """Gold answer."""
    created_at: float = Field(default_factory=time.time)
    """Unix time generation finished."""
    generation_s: float = Field(0.0, ge=0.0)
    """Seconds from submitting the request to its last token (queueing included)."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Base temperature ``T`` the sample was drawn at (0: greedy)."""
    temperature_tau: float = Field(0.0, ge=0.0, lt=1.0)
    """``tau`` of the adaptive temperature it was drawn at; 0 if it was off or had no
    statistics (the sample is then at ``T``)."""
    norm_entropys: NormEntropysValue | None = None
    """The statistics its adaptive temperature used; None when ``temperature_tau`` is 0."""
    stats_version: int | None = Field(None, ge=0)
    """Policy version whose training step measured ``norm_entropys`` (that of the weights
    that started the sample); None where they came from the prompt."""

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.response_ids)} tokens"
            )
        if self.sample_idx >= self.n:
            raise ValueError(f"sample_idx {self.sample_idx} is not below n={self.n}")
        if self.policy_version_end < self.policy_version:
            raise ValueError("policy_version_end is below policy_version")
        if self.temperature_tau > 0 and self.norm_entropys is None:
            raise ValueError("temperature_tau > 0 needs the norm_entropys it sampled with")
        return self

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse token ids a model with ``vocab_size`` tokens has no embedding for (a
        consumer that embeds them would fail on this sample at every restart).

        Raises:
            MalformedMessage: naming the field and the id.
        """
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(self, name)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = int(ids.min() if ids.min() < 0 else ids.max())
                raise MalformedMessage(
                    f"{name}: token id {bad} is outside the model's vocabulary [0, {vocab_size})"
                )

    @property
    def key(self) -> SampleKey:
        """Idempotency key: duplicates after a redelivery share it."""
        return SampleKey(
            run_id=self.run_id,
            group_id=self.group_id,
            sample_idx=self.sample_idx,
            policy_version=self.policy_version,
        )


class ScoredTrajectory(Trajectory):
    """A trajectory with its reward (``hapo:scored:<run id>``)."""

    reward: float = Field(allow_inf_nan=False)
    """Scalar outcome reward: finite (a NaN or infinite reward from a custom scorer is
    refused here, and the reward worker dead-letters that sample with the reason)."""
    reward_reason: str = Field(max_length=256)
    """Why: ``correct``, ``wrong``, ``no_answer``, ``timeout``, ... (for metrics and debugging)."""
    scored_at: float = Field(default_factory=time.time)
    """Unix time the reward was computed."""

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory, reward: float, reason: str) -> Self:
        return cls(**dict(trajectory), reward=reward, reward_reason=reason)


class DeadLetter(_Message):
    """A message no consumer could use (``hapo:dead``), kept with the reason."""

    source_stream: str
    """Stream the message came from."""
    source_id: str
    """Its entry id there."""
    consumer: str
    """Consumer that gave up on it."""
    reason: str
    """Why it was rejected."""
    fields: dict[bytes, bytes]
    """The original entry, byte for byte."""
    failed_at: float = Field(default_factory=time.time)
    """Unix time."""
