"""The typed, frozen run configuration: one dataclass per TOML section, each numeric key annotated
with its range (ranges.py), and the model presets. No JAX here: a config loads without it."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..core.errors import ConfigError, did_you_mean
from ..core.tokenizer import VOCAB_SIZE
from .ranges import (
    INT32_MAX,
    Count,
    Count0,
    Decay,
    Factor,
    Finite,
    NonNegative,
    OpenProbability,
    Positive,
    Probability,
    Range,
    Seed,
)

MeshAxis = Annotated[int, Range(-1, INT32_MAX, integer=True)]  # -1: the devices the other axes leave


PRESETS: dict[str, dict[str, int]] = {
    # The research presets (docs/design.md, "The model").
    "microscope": dict(dim=288, n_layers=144, n_heads=12, intermediate_size=768),
    "deep_narrow_40": dict(dim=384, n_layers=40, n_heads=12, intermediate_size=1536),
    "standard": dict(dim=512, n_layers=12, n_heads=8, intermediate_size=2048),
    # Our own CPU presets.
    "tiny": dict(dim=64, n_layers=4, n_heads=4, intermediate_size=192),
    "small": dict(dim=128, n_layers=8, n_heads=4, intermediate_size=384),
    "test": dict(dim=32, n_layers=2, n_heads=4, intermediate_size=64),
}


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # one of PRESETS; explicit keys below override it
    dim: Count | None = None  # model width (None: from preset)
    n_layers: Count | None = None  # decoder blocks (None: from preset)
    n_heads: Count | None = None  # query heads (None: from preset)
    n_kv_heads: Count | None = None  # key/value heads for GQA (None: n_heads)
    intermediate_size: Count | str | None = None  # SwiGLU width; "auto" = 4 * dim
    norm_type: Literal["deepnorm", "rmsnorm"] = "rmsnorm"  # post-norm DeepNet or pre-norm RMSNorm
    deepnorm_beta_init: bool = True  # scale ffn/value/output init by (8N)^(-1/4) under deepnorm
    rope_base: Positive = 10000.0  # rotary embedding base
    attention: str = "xla"  # attention backend: a name in attention.BACKENDS, or "auto"
    remat: bool = False  # recompute each block in the backward pass to save memory
    scan_unroll: Count = (
        1  # blocks per iteration of the layer scan (n_layers: no loop); compiles slower, may run faster
    )
    embed_init_std: NonNegative = 0.02  # std of the tied embedding; sets initial logit scale
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # activations and matmuls; weights stay float32


@dataclass(frozen=True)
class ModelSpec:
    """`[model]` with its preset applied: every size known. `Config.model` is one of these."""

    preset: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    norm_type: Literal["deepnorm", "rmsnorm"]
    deepnorm_beta_init: bool
    rope_base: float
    attention: str
    remat: bool
    scan_unroll: int
    embed_init_std: float
    compute_dtype: Literal["bfloat16", "float32"]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "bible"  # "bible" (embedded default, imported once into the cache) or a path
    cache_dir: str = ""  # where the embedded corpus is imported ("" = ~/.cache/genesis_jax)
    locales: list[str] = field(default_factory=list)  # subset of locales to train on ([] = all)
    seq_len: Count = 128  # bytes per training window
    mask_id: Annotated[int, Range(0, VOCAB_SIZE - 1, integer=True)] = 0  # id written over masked input positions
    verify_corpus: bool = True  # re-hash the corpus files against their manifest at start (off only for huge corpora)


@dataclass(frozen=True)
class TrainingConfig:
    max_steps: Count = 1000  # optimizer updates
    batch_size: Count = 16  # sequences per micro-batch, across all devices
    grad_accum_steps: Count = 1  # micro-batches per optimizer update
    seed: Seed = 0  # drives initialisation and every batch (batch of step s = f(seed, s))
    log_interval: Count = 10  # steps between logged metrics
    val_interval: Count0 = 100  # steps between held-out validations (0 = never)
    val_windows: Count = 64  # held-out windows per locale in one validation
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"  # a NaN/inf loss or gradient norm: see README
    nonfinite_limit: Count0 = 3  # skipped updates or rollbacks allowed in a run before it stops
    rollback_lr_scale: Factor = 0.5  # each rollback multiplies the learning rate by this
    init_from: str = ""  # a Hugging Face model directory whose weights start a new run ("" = random init)
    host_huge_pages: bool = True  # the train command relaunches itself with glibc's huge pages for host memory (README)


@dataclass(frozen=True)
class OptimConfig:
    lr: Positive = 3e-3  # peak learning rate
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup
    warmup_steps: Count0 = 100  # linear warmup; step 0 runs at lr / (warmup + 1)
    min_lr_ratio: Probability = 0.1  # cosine floor as a fraction of lr
    beta1: Decay = 0.9
    beta2: Decay = 0.95
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.1  # applied to matrices only
    decay_embedding: bool = False  # also decay the tied embedding
    grad_clip: NonNegative = 1.0  # global-norm clip (0 = off)


@dataclass(frozen=True)
class CheckpointConfig:
    save_interval: Count = 500  # steps between checkpoints
    keep: Count = 3  # most recent checkpoints kept
    permanent_interval: Count0 = 0  # also keep every step that is a multiple of this (0 = none)
    async_save: bool = True  # write checkpoints in the background


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # write TensorBoard scalars under <run>/tensorboard
    progress: Literal["auto", "bar", "lines"] = "auto"  # bar on a terminal, lines otherwise
    report_interval: Count0 = 0  # steps between report snapshots, PNG plots in <run>/reports/ (report extra; 0 = never)


@dataclass(frozen=True)
class ParallelConfig:
    """Mesh axis sizes (docs/design.md, "Sharding"); their product is the device count."""

    data: MeshAxis = -1  # batch split, state replicated (-1: the devices the other axes leave)
    fsdp: MeshAxis = 1  # batch split, parameters and Adam moments sharded (ZeRO-3)
    tensor: MeshAxis = 1  # attention heads and the SwiGLU hidden dimension split (Megatron)


@dataclass(frozen=True)
class CurriculumConfig:
    enabled: bool = True  # run the phase machine BYTE -> WWM -> SPAN
    wwm_trigger_steps: Count0 = 2000  # earliest step for the Phase 1 -> 2 test
    wwm_window: Count = 500  # steps between the baseline and the improvement test
    wwm_threshold: NonNegative = 0.01  # relative loss-EMA improvement below which WWM starts
    wwm_mask_prob: Probability = 0.15  # target fraction of words masked in Phase 2
    wwm_ramp_steps: Count0 = 500  # steps to ramp the mask probability up to the target
    span_trigger_steps: Count0 = 2000  # steps in Phase 2 before the Phase 2 -> 3 test
    span_window: Count = 500
    span_threshold: NonNegative = 0.01
    span_mask_prob: Probability = 0.15  # target masked density in Phase 3
    span_ramp_steps: Count0 = 500
    span_min_len: Count = 2  # span length k ~ uniform{min..max} words, one per batch
    span_max_len: Count = 5
    mask_ramp_start: Probability = 0.05  # mask probability at the start of each ramp
    analytics_window: Count = 100  # loss analytics window; EMA alpha = 2 / (window + 1)
    loss_ema_decay: Probability = 0.99  # the loss EMA the phase machine and stun watch (on the device)
    locale_ema_decay: Probability = 0.99  # per-locale EMA of per-sequence loss
    plateau_lr_patience: Count0 = (
        1000  # steps without a new phase-local EMA minimum (counted from a phase's anchor) before a stun (0 = off)
    )
    plateau_lr_drop: Factor = 0.5  # stun: LR multiplier and Adam first moment scaled by this
    plateau_min_delta: Decay = 1e-3  # a loss-EMA minimum counts only if it beats the last by this fraction
    stun_max_count: Count0 = 1  # stuns allowed in a run
    stun_cooldown_steps: Count0 = 0  # steps between two stuns
    stun_recovery_steps: Count0 = 0  # ramp the multiplier back to 1 over this many steps (0 = permanent)


@dataclass(frozen=True)
class EvalConfig:
    interval: Count0 = 0  # steps between quick evaluations during training (0 = never)
    val_windows: Count = 64  # held-out windows per locale (full suite; quick uses a quarter)
    reconstruction_windows: Count = 32  # held-out windows per locale and masking kind (full; quick: a quarter)
    mask_prob: OpenProbability = 0.15  # random and span masking probability in the reconstruction test
    span_len: Count = 3  # words per span in the reconstruction test
    alignment_keys: Count = 256  # held-out verse keys embedded per locale (both suites: chance = 1 / keys)
    embed_len: Count = 128  # bytes of a verse read for its embedding
    max_val_ppl: Positive = 8.0  # go/no-go: validation perplexity at most this
    max_train_val_gap: Finite = 0.3  # go/no-go: validation minus training cross-entropy at most this (nats)
    min_alignment_acc: Probability = 0.02  # go/no-go: mean cross-lingual top-1 retrieval accuracy at least this
    grokking_drop: NonNegative = (
        0.1  # validation loss falling by this fraction within the window: a grokking signal (0 = off)
    )
    grokking_window: Count = 1000  # steps over which the drop is measured
    grokking_min_step: Count0 = 2000  # no grokking signal before this step (early training always drops fast)


@dataclass(frozen=True)
class MTLConfig:
    enabled: bool = False  # mix auxiliary tasks into training
    lm_weight: NonNegative = 0.70  # task mixture: probability that a micro-batch is this task
    coherence_weight: NonNegative = 0.15
    cross_ref_weight: NonNegative = 0.075
    paraphrase_weight: NonNegative = 0.075
    lm_loss_weight: NonNegative = 1.0  # per-task loss weights, separate from the mixture
    coherence_loss_weight: NonNegative = 1.0
    cross_ref_loss_weight: NonNegative = 1.0
    paraphrase_loss_weight: NonNegative = 1.0
    max_len: Count = 128  # bytes of a verse read for a task example
    head_dim: Count = 128  # width of the task heads' MLPs and projections
    triplet_margin: NonNegative = 0.5  # cross_ref: max(0, cos(a, neg) - cos(a, pos) + margin)
    paraphrase_scale: Positive = 5.0  # paraphrase: logit = scale * cos
    cross_ref_window: Count = 5  # cross_ref positive: within +-window keys of the anchor
    cross_ref_min_distance: Count = 100  # cross_ref negative: at least this many keys away
    task_ema_decay: Decay = 0.9  # host-side EMA of each task's loss and accuracy over its micro-batches


@dataclass(frozen=True)
class Config:
    model: ModelSpec = field(default_factory=lambda: resolve_model(ModelConfig()))
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mtl: MTLConfig = field(default_factory=MTLConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# [section] name -> the dataclass its TOML table is read into ([model] is resolved afterwards).
SECTIONS: dict[str, type] = {**typing.get_type_hints(Config), "model": ModelConfig}


def resolve_model(m: ModelConfig) -> ModelSpec:
    """Fill model keys from the preset; "auto" intermediate size becomes 4 * dim."""
    if m.preset not in PRESETS:
        raise ConfigError(
            f"model.preset = {m.preset!r}: unknown preset{did_you_mean(m.preset, list(PRESETS))}; known: {', '.join(PRESETS)}"
        )
    preset = PRESETS[m.preset]
    dim = m.dim if m.dim is not None else preset["dim"]
    size = m.intermediate_size if m.intermediate_size is not None else preset["intermediate_size"]
    if size == "auto":
        size = 4 * dim
    elif isinstance(size, str):
        raise ConfigError(f'model.intermediate_size = {size!r}: expected an integer or "auto"')
    n_heads = m.n_heads if m.n_heads is not None else preset["n_heads"]
    return ModelSpec(
        **{
            **dataclasses.asdict(m),
            "dim": dim,
            "n_heads": n_heads,
            "intermediate_size": size,
            "n_layers": m.n_layers if m.n_layers is not None else preset["n_layers"],
            "n_kv_heads": m.n_kv_heads if m.n_kv_heads is not None else n_heads,
        }
    )
