"""The configuration tree: one pydantic model per section, a docstring and bounds on
every field, and the validators that tie sections together (``hapo.config``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

ENV_PREFIX = "HAPO_"

RUN_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""What a run id looks like: it names a folder and Redis keys (``<prefix>:scored:<run id>``)."""
MIN_API_TOKEN_CHARS = 16
"""Shortest ``api.token`` accepted: an empty or short token opens the admin APIs to
anyone who guesses it."""
MAKE_API_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
"""The command an error tells a user to run for a token."""
MASK = "**********"
"""What a secret is shown as (pydantic's ``SecretStr`` mask)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class RolloutConfig(_Section):
    adaptive_temperature: bool = True
    """Sample each token at ``T * (1 + h_hat * temperature_tau)`` (HAPO part 1)."""
    temperature_tau: float = Field(0.05, ge=0.0, lt=1.0)
    """Relative range of the adaptive temperature; lower it if training collapses."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Base sampling temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    n: int = Field(8, ge=1, le=1024)
    """Samples per prompt (the group size)."""


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0.0, le=1.0)
    """AdamW learning rate. The default suits the default model (135M) and the 20-step
    demo run; the reference recipe trains 7B+ models with 1e-6."""
    lr_warmup_steps: int = Field(2, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.1, ge=0.0, le=1.0)
    """AdamW weight decay."""


class ActorConfig(_Section):
    adaptive_advantage: bool = True
    """Differential advantage redistribution by token entropy (HAPO part 3)."""
    adv_beta: float = Field(1.0, ge=0.0, le=10.0)
    """Strength of the advantage redistribution."""
    adaptive_clip: bool = True
    """Asymmetric adaptive clipping by token entropy (HAPO part 4)."""
    clip_alpha: float = Field(1.0, ge=0.0, le=10.0)
    """Strength of the adaptive clip bounds."""
    clip_ratio_low: float = Field(0.2, ge=0.0, le=1.0)
    """PPO lower clip range: ratio >= 1 - clip_ratio_low."""
    clip_ratio_high: float = Field(0.2, ge=0.0, le=10.0)
    """PPO upper clip range: ratio <= 1 + clip_ratio_high."""
    clip_ratio_c: float = Field(10.0, gt=1.0)
    """Dual-clip bound on the loss of negative-advantage tokens."""
    entropy_pivot: float = Field(0.8, ge=0.0, le=1.0)
    """Quantile of the batch's token log-entropies used as the centre of h_hat."""
    ppo_mini_batch_size: int = Field(4, ge=1)
    """Prompts per optimizer step (each with ``rollout.n`` samples). The default takes two
    optimizer steps per training step (8 prompts), so the PPO ratio leaves 1 on the second
    and clipping, ``ada_clip`` and ``ada_advantage`` act (docs/design.md, decision 7)."""
    ppo_micro_batch_size_per_gpu: int = Field(8, ge=1)
    """Samples per forward/backward pass (gradient accumulation)."""
    ppo_epochs: int = Field(1, ge=1, le=100)
    """Passes over each step's batch."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Maximum global gradient norm."""
    optim: OptimConfig = OptimConfig()
    """Optimizer settings."""


class ActorRolloutRefConfig(_Section):
    actor: ActorConfig = ActorConfig()
    """The learner (verl's actor)."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling."""


class RolloutCorrectionConfig(_Section):
    """Behaviour correction of asynchronous rollouts (decoupled PPO): each token's loss is
    weighted by ``w = pi_prox / mu``, truncated, or whole sequences are dropped
    (``hapo.algorithm.compute_rollout_correction``). The thresholds have verl's names."""

    mode: Literal["off", "token_tis", "seq_tis", "seq_mask", "geo_mask"] = "token_tis"
    """``off``: none (the reference release); ``token_tis``: ``min(w, rollout_is_threshold)``
    per token; ``seq_tis``: the sequence's product of ``w``, truncated likewise, on each of
    its tokens; ``seq_mask``/``geo_mask``: drop sequences whose product/geometric mean of
    ``w`` is outside ``[rollout_rs_threshold_lower, rollout_rs_threshold]``."""
    rollout_is_threshold: float = Field(2.0, gt=1.0)
    """Truncation cap of the ``token_tis`` and ``seq_tis`` weights."""
    rollout_rs_threshold: float = Field(2.0, ge=1.0)
    """Largest ratio ``seq_mask``/``geo_mask`` keep; a geometric mean needs a tight bound
    such as 1.001."""
    rollout_rs_threshold_lower: float | None = Field(None, gt=0.0, le=1.0)
    """Smallest ratio ``seq_mask``/``geo_mask`` keep; unset: ``1 / rollout_rs_threshold``."""
    recompute_at_sampling_temperature: bool = False
    """Take ``pi_prox`` of the correction and of its ``rollout_corr/`` metrics at each
    token's sampling temperature ``T_dyn`` (``adaptive_temperature_log_probs``), so that
    ``w`` measures staleness and engine mismatch only; the PPO ratio keeps ``pi_prox`` at
    the base temperature. False: at the base temperature, so ``w`` also reweights
    ``T_dyn``'s samples towards the base temperature."""

    @model_validator(mode="after")
    def _check_rejection_bounds(self) -> Self:
        upper, lower = self.rollout_rs_threshold, self.rollout_rs_threshold_lower
        if lower is None:
            lower = 1.0 / upper
        if lower >= upper:
            raise ValueError(
                f"rollout_rs_threshold_lower ({lower}; unset: 1 / rollout_rs_threshold) "
                f"must be below rollout_rs_threshold ({upper})"
            )
        return self


class AlgorithmConfig(_Section):
    adv_estimator: Literal["hapo", "grpo"] = "hapo"
    """Advantage: token-level group average with GRPO fallback (hapo) or GRPO."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide advantages by the group's standard deviation."""
    reference_scale_neg_sign: bool = False
    """Reproduce the reference release's negative scale_neg (h_hat >= 0 almost always)."""
    reference_padding_fallback: bool = False
    """Let padding positions trigger the HAPO->GRPO fallback, as the seed code does."""
    reference_micro_batch_h_hat: bool = False
    """Normalise training-time h_hat per micro-batch, as the reference does."""
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()
    """Behaviour correction of samples drawn by an older policy (``mode=off``: none)."""


class OverlongBufferConfig(_Section):
    enable: bool = False
    """DAPO overlong penalty; off by default, HAPO is very sensitive to it."""
    len: int = Field(16, ge=1)
    """Tokens before ``data.max_response_length`` where the penalty starts."""
    penalty_factor: float = Field(1.0, ge=0.0)
    """Penalty at the maximum length."""


class RewardConfig(_Section):
    scorer: str = Field("math", pattern=r"^(math|[\w.]+:\w+)$")
    """Correctness scorer: ``math`` (math-verify with an exact integer fast path) or a
    ``module:function(response_text, gold_answer) -> float``."""
    format_reward: float = Field(0.0, ge=0.0, le=1.0)
    """Bonus when the response puts its answer in \\boxed{} (0 = off)."""
    timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    """Time limit of one score; past it the reward is 0 with reason ``timeout``."""
    max_scored_chars: int = Field(8192, ge=64, le=10_000_000)
    """Only the last characters of a response are scored (answers come last)."""
    batch_size: int = Field(256, ge=1, le=10_000)
    """Trajectories read and scored per batch."""
    reclaim_idle_s: float = Field(30.0, gt=0.0, le=86_400.0)
    """Pending trajectories of a worker silent this long (it died) are taken over; a live
    worker marks the batch it scores every third of this, however long it takes."""
    max_deliveries: int = Field(5, ge=1, le=10_000)
    """Deliveries of a trajectory without a commit (a worker died on it each time) after
    which it goes to ``<prefix>:dead`` with the reason instead of coming back for ever."""
    http_port: int = Field(8002, ge=0, le=65535)
    """Port of /healthz, /readyz and /metrics (0 = no HTTP server)."""
    overlong_buffer: OverlongBufferConfig = OverlongBufferConfig()
    """Length penalty near the maximum response length."""


class DataConfig(_Section):
    train_files: str = "builtin:addition"
    """Training problems: ``builtin:addition``, ``builtin:addition2``, or a JSONL/Parquet file
    with ``prompt`` and ``answer`` columns."""
    train_batch_size: int = Field(8, ge=1)
    """Prompts per training step."""
    max_prompt_length: int = Field(256, ge=1)
    """Longest prompt in tokens; longer prompts are rejected."""
    max_response_length: int = Field(64, ge=1)
    """Most new tokens per sample."""


class RolloutServiceConfig(_Section):
    """The rollout service's engine and queueing (sampling settings live in
    ``actor_rollout_ref.rollout``)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and activations dtype in vLLM, which the trainer sends the weights in (each
    replica reports its own); ``auto``: bfloat16 on a GPU or on a CPU whose native bf16
    (AVX512-BF16, AMX) multiplies at least 1.25x faster than fp32, measured at start-up,
    else float32 (some CPUs with bf16 flags multiply it slower; emulated bf16 is far
    slower)."""
    max_model_len: int = Field(1024, ge=16, le=1_048_576)
    """Longest prompt + response in tokens."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """vLLM tensor parallelism (GPUs per replica)."""
    data_parallel_size: int = Field(1, ge=1, le=64)
    """vLLM data parallelism (engine replicas in this service)."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=0.98)
    """Share of GPU memory vLLM may take (on CPU: of host RAM, unless kv_cache_space_gib)."""
    kv_cache_space_gib: int = Field(1, ge=0, le=4096)
    """CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); 0 = use the share above."""
    compile_entropy: bool = True
    """Compile the adaptive temperature's entropy pass (one fused pass; ~20 s at start)."""
    weight_transfer: Literal["auto", "nccl", "hapo_gloo"] = "auto"
    """Weight-sync backend: vLLM's nccl on GPU, HAPO's gloo engine on CPU (auto picks)."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture / compilation (faster start, slower decode)."""
    max_groups_in_flight: int = Field(16, ge=1, le=100_000)
    """Prompt groups generating at once; bounds memory and keeps the engine saturated."""
    http_port: int = Field(8001, ge=0, le=65535)
    """Port of health, metrics and weight-update endpoints (0 = none)."""
    reclaim_idle_s: float = Field(300.0, gt=0.0, le=86_400.0)
    """Prompt groups pending this long at a silent replica (it died) are taken over; a live
    replica marks the groups it generates every third of this, however long they take."""
    max_n: int = Field(64, ge=1, le=1024)
    """Most samples per prompt group this replica generates (at least
    ``actor_rollout_ref.rollout.n``); a group asking more goes to ``<prefix>:dead``, as does
    one asking more new tokens than ``max_model_len``."""
    max_deliveries: int = Field(5, ge=1, le=10_000)
    """Deliveries of a prompt group without a commit (its replica died, or its generation
    failed, each time) after which it goes to ``<prefix>:dead`` with the reason."""


class TrainerConfig(_Section):
    """The learner and controller."""

    backend: Literal["local", "ray"] = "local"
    """The learner in this process, or data-parallel over Ray Train workers."""
    num_workers: int = Field(2, ge=1, le=4096)
    """Data-parallel Ray Train workers with ``backend=ray`` (one CPU, or one GPU, each)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner computes: ``auto`` takes the GPU when CUDA is available."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype of the forward and backward passes (weights, gradients and optimizer
    states stay fp32): ``bf16`` autocasts; ``auto`` is bf16 on GPUs and on CPUs whose
    native bf16 (AVX512-BF16, AMX) multiplies at least 1.25x faster than fp32, measured at
    start-up (some with AVX512-BF16 run bf16 at half fp32's speed), fp32 elsewhere."""
    max_staleness: int = Field(1, ge=0, le=100)
    """Policy versions the rollout may run ahead of the learner (0 = on-policy)."""
    total_steps: int = Field(20, ge=1)
    """Training steps of a run (the default: the demo, ~15 minutes on 2 CPU cores)."""
    run_dir: Path = Path("runs")
    """Checkpoints, metrics and plots go to ``run_dir/<run id>/``."""
    logits_chunk_size: int = Field(1024, ge=1, le=1_048_576)
    """Tokens whose vocabulary logits exist at once when computing log-probs and entropy:
    memory ``chunk x vocab x 4`` bytes instead of the whole batch's fp32 logits."""
    reuse_first_forward: bool = True
    """The first mini-batch's training forward also gives its ``pi_prox`` log-probs and
    entropies (its update is taken with the step's starting weights), so only the rest of
    the batch takes the separate no-grad pass: one forward of a mini-batch less a step (an
    eighth of the model FLOPs at the defaults). The cost is memory: that mini-batch's
    micro-batches keep their autograd graphs until the whole batch's entropy statistics
    are in, ``ppo_mini_batch_size x n / ppo_micro_batch_size_per_gpu`` micro-batches' worth
    of activations at once rather than one. Turn off where memory fits one micro-batch."""
    pack_responses: bool = True
    """Run each micro-batch's responses packed in one row without padding, under a mask
    that keeps the samples apart, wherever that takes fewer FLOPs than padded rows (short
    responses of varied lengths: a group's longest often runs to the length limit while
    most stop early); its dense attention loses on long ones, which stay padded. Same
    log-probs and gradients either way; off: always padded."""
    checkpoint_keep_last: int = Field(3, ge=1, le=10_000)
    """Checkpoints kept in ``run_dir/<run id>/checkpoints/``; older ones are deleted."""
    checkpoint_keep_runs: int | None = Field(None, ge=1, le=10_000)
    """Runs under ``run_dir`` whose checkpoints are kept, this one included: after each
    checkpoint, those of all but the newest others (by their newest checkpoint) are
    deleted; their metrics and plots stay. None keeps every run's (the deployments set 3:
    their volume is shared by every run they ever make)."""
    checkpoint_every: int = Field(10, ge=1)
    """Steps between checkpoints (the last step is always saved)."""
    run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)
    """Name of the run (default: a new one)."""
    rollout_urls: list[str] = ["http://127.0.0.1:8001"]
    """Rollout replicas to push weights to (their HTTP base URLs; see
    ``rollout_discovery``)."""
    rollout_discovery: Literal["static", "dns"] = "static"
    """How ``rollout_urls`` name the replicas: each URL is one replica (``static``), or each
    URL's host is resolved before every push and each address is a replica (``dns``: a
    Kubernetes headless Service's name resolves to every ready pod, so replicas that come
    and go all get the weights)."""
    weight_sync_host: str = "127.0.0.1"
    """Address of this trainer that rollout replicas can reach for the weight rendezvous."""
    weight_sync_port: int = Field(29500, ge=1024, le=65000)
    """First port of the weight-sync rendezvous: each replica's transfer group takes the
    lowest port from this one up that no other open group holds."""
    weight_sync_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)
    """A replica that does not answer a weight push in this time is reported and skipped."""
    max_deliveries: int = Field(10, ge=1, le=10_000)
    """Deliveries of a scored sample without a commit after which it goes to
    ``<prefix>:dead`` with the reason. The trainer commits at checkpoints and keeps what it
    holds meanwhile (that counts nothing): each count is a trainer restarted before the
    checkpoint covering the sample, so this is more lenient than the other services."""
    group_timeout_s: float = Field(3600.0, gt=0.0, le=604_800.0)
    """A prompt group of the run still incomplete this long after it was issued (its prompt
    or one of its samples was dead-lettered on the way, so it can never complete) is
    abandoned: never trained, its samples that did arrive acknowledged with the next
    checkpoint, and a replacement group issued. It is checked only when the trainer has read
    everything there is, and a pause restarts the clock; the default is over twice the
    slowest healthy path (``rollout.reclaim_idle_s`` x ``rollout.max_deliveries``: 1500 s)."""
    stall_factor: float = Field(10.0, ge=1.0, le=10_000.0)
    """``/readyz`` answers 503 once the running run has made no step for this many times
    its median step time (over its last 100 steps in this process, so only after its first;
    a paused run is not stalled), so that an orchestrator can restart it; ``/healthz``
    stays a plain liveness answer."""
    exit_after_run: bool = True
    """Exit once the run started at launch ends (``hapo up``, tests); false keeps serving
    the control API so that new runs can be started with ``POST /v1/runs``."""
    logger: list[Literal["console", "tensorboard", "wandb", "mlflow"]] = ["console"]
    """Where each step's metrics go besides ``metrics.jsonl``, any combination (verl's key):
    ``console``, ``tensorboard``, ``wandb`` and ``mlflow`` (these three write under the run
    directory and need ``pip install 'hapo-rl[trackers]'``)."""

    @field_validator("logger", mode="before")
    @classmethod
    def _one_logger_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ModelConfig(_Section):
    path: Path | None = None
    """Local Hugging Face model folder; empty for the default SmolLM2-135M-Instruct."""
    cache_dir: Path = Path("~/.cache/hapo")
    """Where the default model is converted to once and kept."""

    @property
    def local_path(self) -> Path:
        """The model folder to load: ``path``, or the default model under ``cache_dir``."""
        if self.path is not None:
            return self.path.expanduser()
        return self.cache_dir.expanduser() / "models" / "SmolLM2-135M-Instruct"


def mask_url(url: str) -> str:
    """``url`` with its password masked (``redis://user:**********@host:6379/0``, and a
    ``password=`` query parameter likewise): how a Redis URL is shown or logged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: show none of it
        return MASK
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if password is None and all(key != "password" for key, _ in pairs):
        return url
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
    query = urlencode([(k, MASK if k == "password" else v) for k, v in pairs], safe="*")
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


class RedisConfig(_Section):
    url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|unix)://")
    """Redis server carrying all streams (a password in it is masked wherever the config
    is shown or logged)."""
    password: SecretStr | None = None
    """Password of the Redis server (``AUTH``), kept out of the URL so that it can come from
    a secret (``HAPO_REDIS_PASSWORD``); never logged or shown. None: the URL's, if any.
    ``hapo up``, when it starts its own Redis, starts it with this password."""
    stream_prefix: str = Field("hapo", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    """Streams are named ``<prefix>:prompts``, ``<prefix>:trajectories``, ..."""
    dead_maxlen: int = Field(10_000, ge=1, le=100_000_000)
    """About how many dead letters ``<prefix>:dead`` keeps (``XADD ... MAXLEN ~``): the
    oldest are dropped. The other streams are trimmed below what every reader has
    acknowledged."""

    @field_validator("password")
    @classmethod
    def _password_long_enough(cls, password: SecretStr | None) -> SecretStr | None:
        if password is not None and len(password.get_secret_value()) < MIN_API_TOKEN_CHARS:
            raise ValueError(
                f"must be at least {MIN_API_TOKEN_CHARS} characters; set it "
                f"({env_var_name('redis.password')}) to the output of: {MAKE_API_TOKEN}"
            )
        return password

    @field_serializer("url")
    def _mask_password(self, url: str, info: FieldSerializationInfo) -> str:
        # Only where the config is shown (``HapoConfig.to_json``): a plain dump must keep
        # the URL usable (the trainer rebuilds a run's config from one).
        return mask_url(url) if (info.context or {}).get("mask_secrets") else url

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name == "url" else value


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the HTTP APIs bind to; localhost unless you mean otherwise."""
    port: int = Field(8000, ge=1, le=65535)
    """Port of the trainer's control API."""
    max_request_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    """Largest request body any service's HTTP API accepts (413 beyond, before the body is
    parsed or the token checked). A weight update's metadata is about 100 bytes a tensor."""
    token: SecretStr | None = None
    """Bearer token of the trainer's control API and the rollout's weight routes (never
    logged); at least 16 characters. The trainer, and a rollout with ``rollout.http_port``,
    refuse to start without one; ``hapo up`` makes its own."""

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_API_TOKEN_CHARS:
            state = "empty" if not token.get_secret_value() else "shorter"
            raise ValueError(
                f"must be at least {MIN_API_TOKEN_CHARS} characters (it is {state}); set it "
                f"({env_var_name('api.token')}) to the output of: {MAKE_API_TOKEN}"
            )
        return token


class RuntimeConfig(_Section):
    """How the processes of a run start."""

    allocator: Literal["auto", "tcmalloc", "system"] = "auto"
    """Memory allocator of ``hapo rollout``, ``reward``, ``trainer``, ``eval`` and ``bench``
    (preloaded: each re-executes itself once, ``hapo.runtime.allocator``): ``auto`` is
    tcmalloc where it is installed (``libtcmalloc-minimal4``), ``tcmalloc`` requires it,
    ``system`` keeps the C library's. On CPU, glibc's malloc unmaps big freed tensors and
    every step faults them in again (BENCHMARKS.md, "Trainer": the learner step with each)."""


class HapoConfig(_Section):
    seed: int = Field(0, ge=0)
    """Seed of every random generator."""
    actor_rollout_ref: ActorRolloutRefConfig = ActorRolloutRefConfig()
    """Learner and sampler (verl layout)."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Advantage estimator and reference-reproduction switches."""
    reward: RewardConfig = RewardConfig()
    """Reward shaping."""
    data: DataConfig = DataConfig()
    """Batch and length limits."""
    model: ModelConfig = ModelConfig()
    """Model weights."""
    rollout: RolloutServiceConfig = RolloutServiceConfig()
    """Rollout service."""
    trainer: TrainerConfig = TrainerConfig()
    """Trainer service."""
    redis: RedisConfig = RedisConfig()
    """Transport."""
    api: ApiConfig = ApiConfig()
    """HTTP APIs."""
    runtime: RuntimeConfig = RuntimeConfig()
    """Processes."""

    @model_validator(mode="after")
    def _check_batch_shapes(self) -> Self:
        actor = self.actor_rollout_ref.actor
        batch, mini = self.data.train_batch_size, actor.ppo_mini_batch_size
        if batch % mini:
            raise ValueError(
                f"actor_rollout_ref.actor.ppo_mini_batch_size ({mini}) must divide "
                f"data.train_batch_size ({batch})"
            )
        n = self.actor_rollout_ref.rollout.n
        if n > self.rollout.max_n:
            raise ValueError(
                f"rollout.max_n ({self.rollout.max_n}) must be at least "
                f"actor_rollout_ref.rollout.n ({n}): the rollout would refuse every group"
            )
        samples = mini * self.actor_rollout_ref.rollout.n
        if samples % actor.ppo_micro_batch_size_per_gpu:
            raise ValueError(
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu "
                f"({actor.ppo_micro_batch_size_per_gpu}) must divide the samples per mini-batch "
                f"(ppo_mini_batch_size x rollout.n = {samples})"
            )
        response, context = self.data.max_response_length, self.rollout.max_model_len
        if response > context:
            raise ValueError(
                f"data.max_response_length ({response}) must not exceed rollout.max_model_len "
                f"({context}): the rollout would refuse every group"
            )
        buffer = self.reward.overlong_buffer
        if buffer.enable and buffer.len >= self.data.max_response_length:
            raise ValueError(
                f"reward.overlong_buffer.len ({buffer.len}) must be below "
                f"data.max_response_length ({self.data.max_response_length})"
            )
        return self

    def to_json(self) -> str:
        """The effective config as JSON, secrets masked (``api.token``, ``redis.password``,
        a password in ``redis.url``): what services log at start-up, ``hapo config show`` and
        ``GET /v1/config`` show."""
        return self.model_dump_json(context={"mask_secrets": True})


def new_api_token() -> str:
    """A fresh random ``api.token`` (43 characters), as ``hapo up`` makes for its session."""
    return secrets.token_urlsafe(32)


def require_api_token(config: HapoConfig, needed_by: str) -> SecretStr:
    """The configured ``api.token``; a service that needs one calls this at start-up.

    Raises:
        ConfigError: no token is set; the message names the key, what needs it and how to
            make one. (A short one never gets this far: the config refuses it.)
    """
    token = config.api.token
    if token is None:
        raise ConfigError(
            f"api.token ({env_var_name('api.token')}) is not set, and {needed_by} needs it; "
            f"set it to at least {MIN_API_TOKEN_CHARS} random characters, e.g. the output "
            f"of: {MAKE_API_TOKEN}"
        )
    return token


def env_var_name(key: str) -> str:
    """Environment variable that sets a dotted key: ``redis.url`` -> ``HAPO_REDIS_URL``."""
    return ENV_PREFIX + key.replace(".", "_").upper()
