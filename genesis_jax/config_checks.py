"""Refusing impossible configurations, naming the key: run once, when a config is loaded.

Only attribute reads of the config's sections happen here, so this module needs none of
config.py at runtime (config.py calls it).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from . import attention
from .errors import ConfigError
from .tokenizer import VOCAB_SIZE

if TYPE_CHECKING:
    from .config import Config, CurriculumConfig, ModelSpec


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value}: must be positive")


def validate(cfg: Config) -> None:
    """Refuse impossible combinations, naming the key."""
    m, t, o, c, d = cfg.model, cfg.training, cfg.optim, cfg.checkpoint, cfg.data
    for key, value in [("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                       ("model.n_kv_heads", m.n_kv_heads), ("model.intermediate_size", m.intermediate_size),
                       ("training.max_steps", t.max_steps), ("training.batch_size", t.batch_size),
                       ("training.grad_accum_steps", t.grad_accum_steps), ("training.log_interval", t.log_interval),
                       ("training.val_windows", t.val_windows), ("data.seq_len", d.seq_len),
                       ("checkpoint.save_interval", c.save_interval), ("checkpoint.keep", c.keep),
                       ("optim.lr", o.lr), ("model.rope_base", m.rope_base), ("model.scan_unroll", m.scan_unroll)]:
        _positive(key, value)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.n_heads = {m.n_heads} does not divide model.dim = {m.dim}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} does not divide model.n_heads = {m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for rotary embeddings")
    for key, value in [("training.val_interval", t.val_interval), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("checkpoint.permanent_interval", c.permanent_interval), ("optim.eps", o.eps)]:
        if value < 0:
            raise ConfigError(f"{key} = {value}: must not be negative")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio = {o.min_lr_ratio}: must be within [0, 1]")
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} = {value}: must be within [0, 1)")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"training.seed = {t.seed}: must be within [0, 2**32)")
    if t.nonfinite_limit < 0:
        raise ConfigError(f"training.nonfinite_limit = {t.nonfinite_limit}: must not be negative")
    if not 0.0 < t.rollback_lr_scale <= 1.0:
        raise ConfigError(f"training.rollback_lr_scale = {t.rollback_lr_scale}: must be within (0, 1]")
    if not 0 <= d.mask_id < VOCAB_SIZE:
        raise ConfigError(f"data.mask_id = {d.mask_id}: must be a token id in [0, {VOCAB_SIZE})")
    if m.attention not in attention.names():
        raise ConfigError(f"model.attention = {m.attention!r}: expected one of {', '.join(map(repr, attention.names()))}"
                          f"{did_you_mean(m.attention, attention.names())}")
    validate_curriculum(cfg.curriculum)
    validate_parallel(cfg)
    e = cfg.eval
    for key in ("val_windows", "reconstruction_windows", "span_len", "alignment_keys", "embed_len", "max_val_ppl"):
        _positive(f"eval.{key}", getattr(e, key))
    mt = cfg.mtl
    weights = [mt.lm_weight, mt.coherence_weight, mt.cross_ref_weight, mt.paraphrase_weight]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("mtl.*_weight: mixture weights must be non-negative with a positive sum")
    for key in ("max_len", "head_dim", "cross_ref_window", "cross_ref_min_distance"):
        _positive(f"mtl.{key}", getattr(mt, key))
    if not 0.0 <= mt.task_ema_decay < 1.0:
        raise ConfigError(f"mtl.task_ema_decay = {mt.task_ema_decay}: must be within [0, 1)")
    if e.grokking_drop < 0 or e.grokking_window <= 0 or e.grokking_min_step < 0:
        raise ConfigError("eval.grokking_drop and eval.grokking_min_step must not be negative, eval.grokking_window must be positive")
    if e.interval < 0:
        raise ConfigError(f"eval.interval = {e.interval}: must not be negative")
    if not 0.0 < e.mask_prob < 1.0:
        raise ConfigError(f"eval.mask_prob = {e.mask_prob}: must be within (0, 1)")


def validate_curriculum(k: CurriculumConfig) -> None:
    for key in ("wwm_mask_prob", "span_mask_prob", "mask_ramp_start", "loss_ema_decay", "locale_ema_decay"):
        value = getattr(k, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"curriculum.{key} = {value}: must be within [0, 1]")
    if not 0.0 <= k.plateau_min_delta < 1.0:
        raise ConfigError(f"curriculum.plateau_min_delta = {k.plateau_min_delta}: must be within [0, 1)")
    if not 0.0 < k.plateau_lr_drop <= 1.0:
        raise ConfigError(f"curriculum.plateau_lr_drop = {k.plateau_lr_drop}: must be within (0, 1]")
    for key in ("wwm_window", "span_window", "analytics_window", "span_min_len"):
        _positive(f"curriculum.{key}", getattr(k, key))
    for key in ("wwm_trigger_steps", "span_trigger_steps", "wwm_ramp_steps", "span_ramp_steps", "plateau_lr_patience",
                "stun_max_count", "stun_cooldown_steps", "stun_recovery_steps"):
        if getattr(k, key) < 0:
            raise ConfigError(f"curriculum.{key} = {getattr(k, key)}: must not be negative")
    if k.span_max_len < k.span_min_len:
        raise ConfigError(f"curriculum.span_max_len = {k.span_max_len} is below curriculum.span_min_len = {k.span_min_len}")


def validate_parallel(cfg: Config) -> None:
    """The mesh checks that need no device count (sharding.check_devices does the rest)."""
    p, m = cfg.parallel, cfg.model
    sizes = {"data": p.data, "fsdp": p.fsdp, "tensor": p.tensor}
    for axis, n in sizes.items():
        if n == 0 or n < -1:
            raise ConfigError(f"parallel.{axis} = {n}: must be positive, or -1 for the remaining devices")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("parallel: at most one of data, fsdp and tensor may be -1")
    if p.tensor > 0:  # -1 is checked once the mesh resolves it
        check_tensor_split(p.tensor, m)


def check_tensor_split(tensor: int, m: ModelSpec) -> None:
    """Heads (query and KV) and the SwiGLU hidden dimension split evenly over `tensor` devices."""
    for key, value in (("model.n_kv_heads", m.n_kv_heads), ("model.intermediate_size", m.intermediate_size)):
        if value % tensor:
            raise ConfigError(f"parallel.tensor = {tensor} does not divide {key} = {value}")
