"""Batches of scored trajectories and the policy's log-probs and entropies over them.

``build_batch`` pads trajectories into ``[B, P + R]`` tensors (prompts left-padded to a
common ``P``, responses right-padded to ``R``), so every response starts at column ``P``;
``policy_log_probs`` runs the model on it, each distinct prompt once and the responses
packed without their padding where that pays (``response_hidden_states``), with vocabulary
logits ``trainer.logits_chunk_size`` tokens at a time in the forward and the backward pass
(``taken_log_probs_chunked``): the ``[B, R, V]`` fp32 logits never exist. Where it runs and
in which dtype: ``learner_device`` and ``compute_dtype`` (``trainer.device``,
``trainer.precision``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hapo.algorithm import adaptive_temperature_log_probs, taken_log_probs_chunked
from hapo.config import HapoConfig
from hapo.runtime.cpus import cpu_bf16_is_faster
from hapo.transport.messages import ScoredTrajectory


@dataclass(frozen=True)
class TrainingBatch:
    """A padded batch of ``B`` samples: prompt ``[:P]`` (left-padded) then response.

    Attributes:
        input_ids: ``[B, P + R]`` int64 token ids, ``pad_token_id`` where padded.
        attention_mask: ``[B, P + R]`` int64, 1 on real tokens.
        position_ids: ``[B, P + R]`` int64, counting real tokens only (left padding must
            not shift rotary positions).
        responses: ``[B, R]`` int64, the response tokens (the targets of the log-probs).
        response_mask: ``[B, R]`` float32, 1 on valid response tokens. Float, not bool:
            torch's CPU reductions over bool masks are several times slower.
        token_level_rewards: ``[B, R]`` float32, the outcome reward on each sample's last
            valid token, 0 elsewhere.
        group_index: ``[B]`` group label (``group_id``) of each sample.
        prompt_length: ``P``; response token ``t`` is predicted at column ``P - 1 + t``.
        rollout_log_prob: ``[B, R]`` float32 behaviour log-probs ``log mu`` the rollout
            sampled each response token with (adaptive temperature applied), 0 at padding.
        staleness: ``[B]`` int64, policy versions between the weights being trained and
            those that started each sample (0: on-policy).
        sampling_temperature: ``[B]`` float32 base temperature ``T`` of each sample (1
            where it was greedy: its log-probs are taken at 1).
        sampling_tau: ``[B]`` float32 ``tau`` of each sample's adaptive temperature; 0
            where it was sampled at ``T``.
        sampling_norm_entropys: ``[B, 4]`` float32 statistics each sample's adaptive
            temperature used (0 where ``tau`` is 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    token_level_rewards: torch.Tensor
    group_index: np.ndarray
    prompt_length: int
    rollout_log_prob: torch.Tensor
    staleness: torch.Tensor
    sampling_temperature: torch.Tensor
    sampling_tau: torch.Tensor
    sampling_norm_entropys: torch.Tensor

    @property
    def size(self) -> int:
        """Number of samples ``B``."""
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> TrainingBatch:
        """The batch with its tensors on ``device``."""
        if self.input_ids.device == device:
            return self
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            responses=self.responses.to(device),
            response_mask=self.response_mask.to(device),
            token_level_rewards=self.token_level_rewards.to(device),
            rollout_log_prob=self.rollout_log_prob.to(device),
            staleness=self.staleness.to(device),
            sampling_temperature=self.sampling_temperature.to(device),
            sampling_tau=self.sampling_tau.to(device),
            sampling_norm_entropys=self.sampling_norm_entropys.to(device),
        )

    def trimmed(self) -> TrainingBatch:
        """The batch without the columns that are padding in every row: the longest
        prompt and the longest response of these rows set the widths (a micro-batch is
        often one group, much shorter than the step's longest sample)."""
        prompt_width = int(self.attention_mask[:, : self.prompt_length].sum(-1).max())
        response_width = int(self.response_mask.sum(-1).max())
        if (prompt_width, response_width) == (self.prompt_length, self.responses.shape[1]):
            return self
        columns = slice(self.prompt_length - prompt_width, self.prompt_length + response_width)
        return replace(
            self,
            input_ids=self.input_ids[:, columns],
            attention_mask=self.attention_mask[:, columns],
            position_ids=self.position_ids[:, columns],
            responses=self.responses[:, :response_width],
            response_mask=self.response_mask[:, :response_width],
            token_level_rewards=self.token_level_rewards[:, :response_width],
            rollout_log_prob=self.rollout_log_prob[:, :response_width],
            prompt_length=prompt_width,
        )

    def select(self, rows: slice) -> TrainingBatch:
        """The samples ``rows`` (a mini- or micro-batch), tensors as views."""
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            position_ids=self.position_ids[rows],
            responses=self.responses[rows],
            response_mask=self.response_mask[rows],
            token_level_rewards=self.token_level_rewards[rows],
            group_index=self.group_index[rows],
            rollout_log_prob=self.rollout_log_prob[rows],
            staleness=self.staleness[rows],
            sampling_temperature=self.sampling_temperature[rows],
            sampling_tau=self.sampling_tau[rows],
            sampling_norm_entropys=self.sampling_norm_entropys[rows],
        )


def build_batch(
    trajectories: Sequence[ScoredTrajectory], pad_token_id: int, policy_version: int | None = None
) -> TrainingBatch:
    """Pad scored trajectories into a ``TrainingBatch`` (in the given order).

    ``policy_version`` is that of the weights the batch will train (its samples'
    staleness is counted from it); ``None``: every sample counts as on-policy.

    Raises:
        ValueError: no trajectory, or one with an empty prompt or response (an empty
            response has no token to carry its reward; the caller must drop it).
    """
    if not trajectories:
        raise ValueError("build_batch needs at least one trajectory")
    for trajectory in trajectories:
        if len(trajectory.prompt_ids) == 0 or len(trajectory.response_ids) == 0:
            raise ValueError(
                f"trajectory {trajectory.key} has an empty prompt or response; drop it first"
            )
    prompt_lengths = np.array([len(t.prompt_ids) for t in trajectories])
    response_lengths = np.array([len(t.response_ids) for t in trajectories])
    batch, prompt_width, response_width = (
        len(trajectories),
        int(prompt_lengths.max()),
        int(response_lengths.max()),
    )
    input_ids = np.full((batch, prompt_width + response_width), pad_token_id, dtype=np.int64)
    for row, trajectory in enumerate(trajectories):
        input_ids[row, prompt_width - len(trajectory.prompt_ids) : prompt_width] = (
            trajectory.prompt_ids
        )
        input_ids[row, prompt_width : prompt_width + len(trajectory.response_ids)] = (
            trajectory.response_ids
        )
    columns = np.arange(prompt_width + response_width)
    attention_mask = (columns >= prompt_width - prompt_lengths[:, None]) & (
        columns < prompt_width + response_lengths[:, None]
    )
    response_mask = np.arange(response_width) < response_lengths[:, None]
    rollout_log_prob = np.zeros((batch, response_width), dtype=np.float32)
    for row, trajectory in enumerate(trajectories):
        rollout_log_prob[row, : len(trajectory.logprobs)] = trajectory.logprobs
    versions = np.array([t.policy_version for t in trajectories], dtype=np.int64)
    staleness = np.zeros_like(versions) if policy_version is None else policy_version - versions
    rewards = np.zeros((batch, response_width), dtype=np.float32)
    rewards[np.arange(batch), response_lengths - 1] = [t.reward for t in trajectories]
    attention = torch.from_numpy(attention_mask.astype(np.int64))
    input_tensor = torch.from_numpy(input_ids)
    return TrainingBatch(
        input_ids=input_tensor,
        attention_mask=attention,
        position_ids=(attention.cumsum(dim=-1) - 1).clamp_min(0),
        responses=input_tensor[:, prompt_width:].clone(),
        response_mask=torch.from_numpy(response_mask.astype(np.float32)),
        token_level_rewards=torch.from_numpy(rewards),
        group_index=np.array([t.group_id for t in trajectories]),
        prompt_length=prompt_width,
        rollout_log_prob=torch.from_numpy(rollout_log_prob),
        staleness=torch.from_numpy(staleness),
        sampling_temperature=torch.tensor([t.temperature or 1.0 for t in trajectories]),
        sampling_tau=torch.tensor([t.temperature_tau for t in trajectories]),
        sampling_norm_entropys=torch.tensor(
            [t.norm_entropys or (0.0, 0.0, 0.0, 0.0) for t in trajectories]
        ),
    )


def learner_device(config: HapoConfig) -> torch.device:
    """``trainer.device`` resolved: ``auto`` is the current CUDA device if there is one."""
    choice = config.trainer.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def compute_dtype(config: HapoConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``trainer.precision`` on ``device`` (``None``: fp32);
    ``auto`` is bf16 on GPUs and on CPUs whose bf16 products are faster than fp32's
    (``cpu_bf16_is_faster``), else fp32."""
    precision = config.trainer.precision
    if precision == "auto":
        native = device.type == "cuda" or cpu_bf16_is_faster()
        precision = "bf16" if native else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def response_hidden_states(
    model: nn.Module, batch: TrainingBatch, *, pack: bool = True
) -> torch.Tensor:
    """``[N, H]`` final hidden states that predict the batch's ``N`` valid response tokens,
    sample by sample (``hidden[response_mask]`` of a padded ``[B, R, H]``): the state at
    column ``P - 1 + t`` predicts response token ``t``. The last response token predicts
    nothing and is not fed.

    Each distinct prompt runs once: the ``n`` samples of a group share it, and it is most
    of a sample's tokens on short-answer tasks. The decoder runs on the ``U`` distinct
    prompts ``[U, P]`` with a KV cache, and the responses on top of it (gradients from every
    sample add up in the shared prompt's activations), either

    - packed (``pack``, where ``packing_pays``): one row of the ``N'`` fed tokens without
      padding, over the ``U`` prompts' caches laid end to end, each token seeing its own
      prompt's real tokens and its own sample's earlier tokens (``packed_attention_mask``).
      Response lengths vary a lot within a group (one sample running to the length limit
      is common), so padding is often half the tokens; or
    - padded: ``[B, R - 1]``, the cache gathered to the ``B`` rows.

    Identical maths to one padded ``[B, P + R]`` forward either way (to float rounding).
    """
    decoder = model.get_decoder()
    prompt_width = batch.prompt_length
    prompt_ids = batch.input_ids[:, :prompt_width]
    prompt_mask = batch.attention_mask[:, :prompt_width]
    _, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0,
                              return_inverse=True)  # fmt: skip
    rows = torch.arange(batch.size, device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), batch.size, device=inverse.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    lengths = batch.response_mask.sum(-1).long()
    fed = torch.arange(batch.responses.shape[1] - 1, device=lengths.device) < lengths[:, None] - 1
    prompt = decoder(
        input_ids=prompt_ids[first],
        attention_mask=prompt_mask[first],
        position_ids=batch.position_ids[first, :prompt_width],
        use_cache=fed.shape[1] > 0,
    )
    last_prompt_state = prompt.last_hidden_state[:, -1]  # [U, H]: each group's first token
    valid = batch.response_mask.bool()
    if fed.shape[1] == 0:
        return last_prompt_state[inverse][valid[:, 0]]
    cache, columns = prompt.past_key_values, slice(prompt_width, prompt_width + fed.shape[1])
    if not (pack and packing_pays(model.config, len(first), prompt_width, fed)):
        cache.reorder_cache(inverse)
        responses = decoder(
            input_ids=batch.input_ids[:, columns],
            attention_mask=batch.attention_mask[:, : columns.stop],
            position_ids=batch.position_ids[:, columns],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return torch.cat([last_prompt_state[inverse, None], responses], dim=1)[valid]
    for layer in cache.layers:  # [U, heads, P, d] -> [1, heads, U P, d]
        layer.keys = layer.keys.transpose(0, 1).flatten(1, 2)[None]
        layer.values = layer.values.transpose(0, 1).flatten(1, 2)[None]
    packed = decoder(
        input_ids=batch.input_ids[:, columns][fed][None],
        attention_mask=packed_attention_mask(prompt_mask[first].bool(), inverse, fed),
        position_ids=batch.position_ids[:, columns][fed][None],
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[0]
    # Each valid token's state: its prompt's last (t = 0), else the packed state of the
    # token before it (packed in row-major order of ``fed``).
    packed_row = len(first) + fed.flatten().cumsum(0).view(fed.shape) - 1
    source = torch.cat([inverse[:, None], packed_row], dim=1)[valid]
    return torch.cat([last_prompt_state, packed]).index_select(0, source)


def packing_pays(architecture: Any, prompts: int, prompt_width: int, fed: torch.Tensor) -> bool:
    """Whether the packed response forward takes fewer FLOPs than the padded one.

    Packing feeds only the ``N'`` real tokens, but its attention is dense over all of
    them: ``N' x (U P + N')`` positions against the padded ``B (R - 1) x (P + R - 1)``. A
    token through a layer's weight matrices costs as much as attending to
    ``2 x weights / (4 x hidden)`` positions (~3,000 for SmolLM2-135M), so packing wins
    where padding is a large share of the rows and loses where it is not and ``N'`` runs
    to thousands (long responses of similar lengths, large micro-batches).

    Args:
        architecture: a Llama-type model config (``hidden_size``, ``intermediate_size``,
            attention and key-value heads).
        prompts: ``U``, distinct prompts; ``prompt_width``: ``P``.
        fed: ``[B, R - 1]`` the tokens each sample feeds (``N'`` in all).
    """
    positions_per_token = 2 * layer_weights(architecture) / (4 * architecture.hidden_size)
    rows, width = fed.shape
    packed_tokens = int(fed.sum())
    packed = packed_tokens * (positions_per_token + prompts * prompt_width + packed_tokens)
    padded = rows * width * (positions_per_token + prompt_width + width)
    return packed < padded


def layer_weights(architecture: Any) -> int:
    """Weights of one decoder layer's matrix products (query, key, value and output
    projections, the gated MLP's three) of a Llama-type ``architecture``: what a token fed
    through the layer multiplies by, 2 FLOPs each."""
    hidden = architecture.hidden_size
    head_dim = getattr(architecture, "head_dim", None) or hidden // architecture.num_attention_heads
    kv = architecture.num_key_value_heads * head_dim
    return hidden * (2 * hidden + 2 * kv) + 3 * hidden * architecture.intermediate_size


def packed_attention_mask(
    prompt_valid: torch.Tensor, group: torch.Tensor, fed: torch.Tensor
) -> torch.Tensor:
    """``[1, 1, N', U P + N']`` boolean attention mask of ``N'`` packed response tokens over
    ``U`` prompts' cache laid end to end, then themselves.

    Args:
        prompt_valid: ``[U, P]`` real (not left-padding) tokens of each distinct prompt.
        group: ``[B]`` index of each sample's prompt.
        fed: ``[B, R]`` the tokens fed of each sample (a prefix of each row), packed in
            row-major order.
    """
    distinct, width = prompt_valid.shape
    sample = torch.arange(fed.shape[0], device=fed.device)[:, None].expand_as(fed)[fed]
    position = torch.arange(fed.shape[1], device=fed.device).expand_as(fed)[fed]
    own_prompt = group[sample][:, None] == torch.arange(distinct, device=fed.device)
    sees_prompt = (own_prompt[:, :, None] & prompt_valid[None]).view(-1, distinct * width)
    sees_token = (sample[:, None] == sample) & (position[:, None] >= position)
    return torch.cat([sees_prompt, sees_token], dim=1)[None, None]


def policy_log_probs(
    model: nn.Module,
    batch: TrainingBatch,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    dtype: torch.dtype | None = None,
    pack: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of a batch's response tokens under a causal LM.

    ``model`` is a transformers ``*ForCausalLM`` whose logits are ``lm_head(hidden)``
    without bias or soft-capping (Llama, Qwen2, Mistral, SmolLM2); only the response
    columns' hidden states go through the vocabulary projection.

    ``pack``: responses run packed where that takes fewer FLOPs (``response_hidden_states``);
    ``False``: always padded.

    With ``dtype`` (bf16) the decoder runs under autocast and the vocabulary projection
    multiplies in ``dtype``; softmax, log-probs and entropies stay fp32 (``chunk_logits``).
    The projection is cast explicitly rather than autocast because its backward pass
    recomputes the logits outside autocast, and forward and backward must agree.

    Returns:
        ``(log_prob, entropy)``, ``[B, R]`` fp32 each (entropy ``None`` unless asked), 0 at
        masked positions.

    Raises:
        ValueError: the model's logits are not ``lm_head(hidden)`` (a bias, soft-capping or
            scaling), which the chunked projection would silently get wrong.
    """
    tokens = valid_response_tokens(model, batch, dtype, pack=pack)
    log_prob, entropy = taken_log_probs_chunked(
        tokens.hidden,
        tokens.lm_head_weight,
        tokens.ids,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
    return tokens.to_grid(log_prob), None if entropy is None else tokens.to_grid(entropy)


@dataclass(frozen=True)
class ValidResponseTokens:
    """The ``N`` valid response tokens of a batch, ready for the vocabulary projection.

    Attributes:
        hidden: ``[N, H]`` final hidden states that predict them.
        lm_head_weight: ``[V, H]`` output projection, in the same dtype.
        ids: ``[N]`` the tokens.
        valid: ``[B, R']`` mask of the trimmed batch they were taken from.
        width: ``R``, the untrimmed batch's response width.
    """

    hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor
    width: int

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-token values -> ``[B, R]``, 0 at padding."""
        grid = values.new_zeros(self.valid.shape).masked_scatter(self.valid, values)
        return nn.functional.pad(grid, (0, self.width - self.valid.shape[1]))

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` per-sample values -> ``[N]``, one per valid token."""
        values = values.to(self.valid.device)[:, None]
        return values.expand(self.valid.shape)[self.valid]


def valid_response_tokens(
    model: nn.Module, batch: TrainingBatch, dtype: torch.dtype | None = None, *, pack: bool = True
) -> ValidResponseTokens:
    """Run the decoder (under ``dtype`` autocast) and keep the valid response tokens: only
    they go through the vocabulary projection (the costliest matmul of a small model), so
    padding costs nothing there.

    Raises:
        ValueError: the model's logits are not ``lm_head(hidden)`` (a bias, soft-capping or
            scaling), which the chunked projection would silently get wrong.
    """
    head = model.get_output_embeddings()
    scaling = ("final_logit_softcapping", "logit_scale")
    extras = [name for name in scaling if getattr(model.config, name, None)]
    if getattr(head, "bias", None) is not None or extras:
        raise ValueError(f"unsupported output head: bias or {extras} (logits must be hidden @ W.T)")
    width = batch.responses.shape[1]
    batch = batch.trimmed()
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        rows = response_hidden_states(model, batch, pack=pack)
    valid = batch.response_mask.bool()
    weight = head.weight
    if dtype is not None:
        rows, weight = rows.to(dtype), weight.to(dtype)
    return ValidResponseTokens(rows, weight, batch.responses[valid], valid, width)


@torch.no_grad()
def sampling_log_probs(
    model: nn.Module,
    batch: TrainingBatch,
    *,
    chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    pack: bool = True,
) -> torch.Tensor:
    """``[B, R]`` log-probs of the response tokens at the temperature each was sampled at,
    ``T_dyn = T * (1 + h_hat * tau)`` with each sample's own ``sampling_temperature``,
    ``sampling_tau`` and ``sampling_norm_entropys``: the rollout's behaviour log-probs
    ``log mu``, as this model computes them (``adaptive_temperature_log_probs``); 0 at
    padding.

    With the rollout's weights this measures the sampler end to end (``hapo bench
    mismatch``); with newer ones, it is ``pi_prox`` at the sampling temperature.
    """
    tokens = valid_response_tokens(model, batch, dtype, pack=pack)
    log_prob = adaptive_temperature_log_probs(
        tokens.hidden,
        tokens.ids,
        tokens.lm_head_weight,
        temperature=tokens.per_token(batch.sampling_temperature),
        temperature_tau=tokens.per_token(batch.sampling_tau),
        norm_entropys=[tokens.per_token(c) for c in batch.sampling_norm_entropys.unbind(-1)],
        chunk_size=chunk_size,
    )
    return tokens.to_grid(log_prob)


@torch.no_grad()
def old_log_probs_and_entropy(
    model: nn.Module,
    batch: TrainingBatch,
    micro_batch_size: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(old_log_prob, entropy)``, ``[B, R]`` each, with the current weights, no graph."""
    parts = [
        policy_log_probs(
            model,
            batch.select(slice(start, start + micro_batch_size)),
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=True,
            dtype=dtype,
        )
        for start in range(0, batch.size, micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
