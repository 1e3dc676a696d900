"""The attention backends: one registry that the model, the config check, `verify` and the
attention benchmark all read. Adding a backend is one `register` call (docs/design.md).

Every backend has the kernels' signature, `fn(q, k, v, *, causal, segment_ids, sm_scale)` on
`[batch, seq, heads, head_dim]` (grouped-query: k/v may have fewer heads), and a decode
function for the KV-cache path: queries at positions `start..start+l` against a cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import jax
from jax.sharding import Mesh, PartitionSpec as P

from ..core.errors import ConfigError, did_you_mean
from ..kernels.blocked_attention import blocked_attention
from ..kernels.flash_attention import flash_attention
from ..kernels.platform import target_platform
from ..kernels.reference import decode_attention, reference_attention
from ..parallel.sharding import BATCH, attention_spec


class AttentionFn(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        causal: bool = True,
        segment_ids: jax.Array | None = None,
        sm_scale: float | None = None,
    ) -> jax.Array: ...


class DecodeFn(Protocol):
    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array) -> jax.Array: ...


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    decode: DecodeFn  # the KV-cache path (one or a few queries: a flash kernel gains nothing there)
    platforms: tuple[str, ...] | None  # where it runs (None: everywhere)
    summary: str
    compiled_on: tuple[str, ...] | None = None  # elsewhere it is emulated (None: compiled everywhere)

    def unavailable(self, platform: str) -> str | None:
        """Why this backend cannot run on `platform` (None: it can)."""
        if self.platforms is None or platform in self.platforms:
            return None
        return f"model.attention = {self.name!r} needs {' or '.join(self.platforms)}; this backend is {platform!r}"

    def emulated(self, platform: str) -> bool:
        """True where it runs but its time is not a kernel speed (Pallas interpret mode)."""
        return self.compiled_on is not None and platform not in self.compiled_on


BACKENDS: dict[str, Backend] = {}
AUTO = "auto"  # not a backend: the best registered one for the platform, chosen by `auto_choice`


def register(backend: Backend) -> Backend:
    if backend.name in BACKENDS or backend.name == AUTO:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def names() -> list[str]:
    """What `model.attention` accepts."""
    return [*BACKENDS, AUTO]


def check_name(name: str) -> None:
    """Refuse a `model.attention` that names no backend: commands call it right after loading a
    config (the config itself imports no kernel), and `backend` before choosing."""
    if name not in names():
        raise ConfigError(
            f"model.attention = {name!r}: expected one of {', '.join(map(repr, names()))}{did_you_mean(name, names())}"
        )


def auto_choice(platform: str) -> str:
    return "pallas" if platform == "gpu" else "xla"


def backend(name: str, platform: str | None = None) -> Backend:
    """The backend `model.attention = name` selects on `platform` (default: the target's,
    `kernels.target_platform`), or a ConfigError naming the key when it does not exist or
    cannot run there."""
    platform = platform or target_platform()
    if name == AUTO:
        name = auto_choice(platform)
    check_name(name)
    b = BACKENDS[name]
    why = b.unavailable(platform)
    if why:
        raise ConfigError(why)
    return b


def _cudnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    if segment_ids is not None:
        raise ValueError("cudnn backend: segment_ids are not supported")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale, implementation="cudnn")


def _mosaic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """The Mosaic GPU kernel where it applies (bf16/fp16, head_dim <= 128), the Triton one elsewhere."""
    from ..kernels.mosaic.forward import HEAD_DIMS, SUPPORTED_DTYPES, flash_attention_mgpu

    kernel = flash_attention_mgpu
    if q.dtype not in SUPPORTED_DTYPES or q.shape[-1] > HEAD_DIMS[-1]:
        kernel = flash_attention
    return kernel(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)


def _plain(fn: Callable[..., jax.Array]) -> AttentionFn:
    """The kernels' own keywords (block sizes, interpret) stay at their defaults here."""

    def attend(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        causal: bool = True,
        segment_ids: jax.Array | None = None,
        sm_scale: float | None = None,
    ) -> jax.Array:
        return fn(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)

    attend.__name__ = attend.__qualname__ = fn.__name__
    return attend


register(
    Backend(
        "xla",
        _plain(blocked_attention),
        decode_attention,
        None,
        "blocked jnp attention with a recomputing backward (kernels/blocked_attention.py): the fast path off the GPU",
    )
)
register(
    Backend(
        "reference",
        _plain(reference_attention),
        decode_attention,
        None,
        "plain jnp softmax attention (float32 softmax); the reference every other backend is checked against",
    )
)
# Off the GPU the Pallas kernel runs in interpret mode: correct and slow, for tests.
register(
    Backend(
        "pallas",
        _plain(flash_attention),
        decode_attention,
        None,
        "our fused flash-attention kernel (kernels/flash_attention.py)",
        compiled_on=("gpu",),
    )
)
# GPU only: off it the Mosaic kernel runs in GPU interpret mode, for its own tests (minutes per model step).
register(
    Backend(
        "mosaic",
        _mosaic,
        decode_attention,
        ("gpu",),
        "our Mosaic GPU kernel for Hopper (kernels/mosaic/); float32 or head_dim > 128: pallas",
    )
)
register(Backend("cudnn", _cudnn, decode_attention, ("gpu",), "cuDNN's fused attention through jax.nn"))


def per_shard(backend: Backend, mesh: Mesh) -> Backend:
    """The backend run on each device's block (`jax.shard_map`): its batch rows and, under
    `tensor`, its heads; a kernel never sees gathered heads. Attention is independent per row
    and per head, so no communication is needed inside."""
    spec = attention_spec()

    def fn(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        causal: bool = True,
        segment_ids: jax.Array | None = None,
        sm_scale: float | None = None,
    ) -> jax.Array:
        if segment_ids is None:

            def block(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
                return backend.fn(q, k, v, causal=causal, sm_scale=sm_scale)

            return jax.shard_map(block, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
                q, k, v
            )

        def block_seg(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
            return backend.fn(q, k, v, causal=causal, segment_ids=seg, sm_scale=sm_scale)

        return jax.shard_map(
            block_seg, mesh=mesh, in_specs=(spec, spec, spec, P(BATCH, None)), out_specs=spec, check_vma=False
        )(q, k, v, segment_ids)

    return dataclasses.replace(backend, fn=fn)
