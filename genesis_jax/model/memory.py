"""Memory a request needs, estimated before anything is allocated and compared with what the
devices have: a run or a generation that cannot fit is one line naming the knob and the
estimate, instead of an XLA abort (exit 134) or an out-of-memory traceback half-way.

The estimates are lower bounds (what must be resident at once, not XLA's temporaries), so a
refusal is certain to be right; an allocation that still fails is one line too (`cli.out_of_memory`)."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from ..config.schema import Config, ModelSpec
from ..core.errors import UserError
from ..core.tokenizer import VOCAB_SIZE

TRAINING_BYTES_PER_PARAMETER = 16  # float32 weights, gradients and Adam's two moments
FLOAT32 = 4


class ResourceError(UserError):
    """A request whose estimated memory exceeds what the devices have."""


def parameter_count(m: ModelSpec) -> int:
    hd = m.head_dim
    attention = m.dim * m.n_heads * hd * 2 + m.dim * m.n_kv_heads * hd * 2
    ffn = 3 * m.dim * m.intermediate_size
    norms = 4 * m.dim if m.norm_type == "deepnorm" else 2 * m.dim
    return VOCAB_SIZE * m.dim + m.n_layers * (attention + ffn + norms) + m.dim


def available() -> tuple[int, str] | None:
    """Bytes the local devices can still allocate, and what they are; None where unknown.
    CPU devices share the host's memory, so it counts once however many there are."""
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        total = 0
        for d in devices:
            try:
                stats = d.memory_stats() or {}
            except Exception:  # noqa: BLE001 - a backend without statistics: unknown
                return None
            if "bytes_limit" not in stats:
                return None
            total += int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return total, f"the {len(devices)} local {devices[0].platform} device(s)"
    host = host_available()
    return (host, "this host's available memory") if host else None


def host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def refuse_if_over(parts: dict[str, tuple[int, str]], what: str, have: tuple[int, str] | None = None) -> None:
    """`parts`: label -> (bytes, the knobs that set it). Refuses naming the largest part's knobs."""
    have = have if have is not None else available()
    need = sum(b for b, _ in parts.values())
    if have is None or need <= have[0]:
        return
    label, (_, knobs) = max(parts.items(), key=lambda kv: kv[1][0])
    detail = ", ".join(f"{size(b)} {name}" for name, (b, _) in parts.items())
    raise ResourceError(
        f"{what} needs at least {size(need)} ({detail}), but {have[1]} has {size(have[0])}; "
        f"the largest part is {label}: lower {knobs}"
    )


def check_training(cfg: Config) -> None:
    """Before the state is initialised: the state, one micro-batch's logits and residuals, and
    the windows of a whole step (every micro-batch's are drawn together)."""
    m, t = cfg.model, cfg.training
    tokens = t.batch_size * cfg.data.seq_len
    refuse_if_over(
        {
            "the parameters with gradients and Adam moments": (
                TRAINING_BYTES_PER_PARAMETER * parameter_count(m),
                "model.dim, model.n_layers or model.intermediate_size",
            ),
            "one micro-batch's logits and residual stream": (
                tokens * (2 * VOCAB_SIZE + m.n_layers * m.dim) * FLOAT32,
                "training.batch_size or data.seq_len",
            ),
            "one step's windows (inputs, labels, masks), drawn at once": (
                tokens * t.grad_accum_steps * 3 * FLOAT32,
                "training.grad_accum_steps, training.batch_size or data.seq_len",
            ),
            **(task_parts(cfg) if cfg.mtl.enabled else {}),
        },
        "training",
    )


def task_parts(cfg: Config) -> dict[str, tuple[int, str]]:
    """Multi-task training adds its heads (trained like the model) and a micro-batch of verse
    pairs through the model."""
    m, h = cfg.model, cfg.mtl.head_dim
    heads = 2 * m.dim * h + h + h + 1 + 2 * (m.dim * h + h + h * h + h)  # coherence, cross_ref, paraphrase
    pairs = cfg.training.batch_size * 2 * cfg.mtl.max_len
    return {
        "the task heads with gradients and Adam moments": (TRAINING_BYTES_PER_PARAMETER * heads, "mtl.head_dim"),
        "one micro-batch's verse pairs through the model": (
            pairs * m.n_layers * m.dim * FLOAT32,
            "mtl.max_len or training.batch_size",
        ),
    }


def check_generation(m: ModelSpec, samples: int, prompt_len: int, max_tokens: int) -> None:
    """Before the KV cache is allocated: weights, cache and the prompt's logits for every sample."""
    cache_bytes = 2 if m.compute_dtype == "bfloat16" else FLOAT32
    length = prompt_len + max_tokens
    refuse_if_over(
        {
            "the weights": (FLOAT32 * parameter_count(m), "the model (it is the checkpoint's)"),
            "the KV cache": (
                samples * length * m.n_layers * 2 * m.n_kv_heads * m.head_dim * cache_bytes,
                "--num-samples or --max-tokens",
            ),
            "the prompt's logits": (
                samples * prompt_len * VOCAB_SIZE * FLOAT32,
                "--num-samples or the prompt's length",
            ),
        },
        f"generating {samples} sample(s) of up to {length} bytes",
    )
