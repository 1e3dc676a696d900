"""The Llama decoder (docs/design.md, "The model") in Flax NNX, with its blocks stacked and run by `lax.scan`.

Stacking keeps compile time flat in depth (the 144-layer preset compiles like a 1-layer one).

Initialisation (documented choice): the tied embedding is N(0, embed_init_std^2), 0.02 by
default, so initial logits of the unit-RMS final hidden state have std ~0.02 * sqrt(dim) and
the initial loss is close to ln 260. Linear layers: rmsnorm uses truncated-normal fan-in
scaling with the residual-output projections (wo, w2) divided by sqrt(2 * n_layers);
deepnorm uses Xavier-normal with gain beta = (8N)^(-1/4) on w1, w2, w3, wv and wo when
`deepnorm_beta_init` is on (the PyTorch engine documented beta but never applied it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config.schema import ModelSpec
from ..core.tokenizer import VOCAB_SIZE
from . import attention
from .attention import Backend
from .norms import LayerNorm, RMSNorm

KVCache = tuple[
    jax.Array, jax.Array
]  # keys, values [batch, max_len, n_kv_heads, head_dim], stacked over layers in Llama


def deepnorm_alpha(n_layers: int) -> float:
    return (2.0 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    return (8.0 * n_layers) ** -0.25


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]) of `[batch, seq, heads, head_dim]`."""
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    xe, xo = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _linear(
    din: int, dout: int, init: nnx.Initializer, dtype: jnp.dtype, rngs: nnx.Rngs, axes: tuple[str, str]
) -> nnx.Linear:
    """A bias-free projection whose kernel carries logical axis names (sharding.RULES maps them)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        kernel_init=nnx.with_partitioning(init, axes),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _inits(cfg: ModelSpec) -> tuple[nnx.Initializer, nnx.Initializer, nnx.Initializer]:
    """(plain, scaled-input, residual-output) initialisers for the norm type."""
    n = cfg.n_layers
    if cfg.norm_type == "deepnorm":
        plain = nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")
        beta = deepnorm_beta(n) if cfg.deepnorm_beta_init else 1.0
        scaled = nnx.initializers.variance_scaling(beta**2, "fan_avg", "normal")
        return plain, scaled, scaled
    plain = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    out = nnx.initializers.variance_scaling(1.0 / (2.0 * n), "fan_in", "truncated_normal")
    return plain, plain, out


class Attention(nnx.Module):
    def __init__(self, cfg: ModelSpec, attn: Backend, dtype: jnp.dtype, rngs: nnx.Rngs):
        dim, nh, nkv = cfg.dim, cfg.n_heads, cfg.n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, cfg.head_dim
        self.rope_base = cfg.rope_base
        self.attn = attn
        plain, scaled, out = _inits(cfg)
        self.wq = _linear(dim, nh * self.head_dim, plain, dtype, rngs, ("embed", "heads"))
        self.wk = _linear(dim, nkv * self.head_dim, plain, dtype, rngs, ("embed", "kv"))
        self.wv = _linear(dim, nkv * self.head_dim, scaled, dtype, rngs, ("embed", "kv"))
        self.wo = _linear(nh * self.head_dim, dim, out, dtype, rngs, ("heads", "embed"))

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, l, _ = x.shape
        rows = x.reshape(b * l, -1)  # 2-D matmuls (see SwiGLU)
        q = self.wq(rows).reshape(b, l, self.n_heads, self.head_dim)
        k = self.wk(rows).reshape(b, l, self.n_kv_heads, self.head_dim)
        v = self.wv(rows).reshape(b, l, self.n_kv_heads, self.head_dim)
        return rope(q, positions, self.rope_base), rope(k, positions, self.rope_base), v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        b, l, _ = x.shape
        q, k, v = self.qkv(x, positions)
        o = self.attn.fn(q, k, v, causal=True, segment_ids=segment_ids)
        return self.wo(o.reshape(b * l, self.n_heads * self.head_dim)).reshape(b, l, -1)

    def cached(self, x: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """New tokens at positions start.. attend to the cache and themselves; the cache is updated."""
        b, l, _ = x.shape
        positions = start + jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        q, k, v = self.qkv(x, positions)
        ck = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, start, 0, 0))
        o = self.attn.decode(q, ck, cv, start)
        return self.wo(o.reshape(b, l, self.n_heads * self.head_dim).astype(x.dtype)), (ck, cv)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        dim, hidden = cfg.dim, cfg.intermediate_size
        _, scaled, out = _inits(cfg)
        self.w1 = _linear(dim, hidden, scaled, dtype, rngs, ("embed", "mlp"))
        self.w3 = _linear(dim, hidden, scaled, dtype, rngs, ("embed", "mlp"))
        self.w2 = _linear(hidden, dim, out, dtype, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = x.reshape(-1, x.shape[-1])  # 2-D matmuls: XLA:CPU runs [B, L, D] dots about 2x slower
        dtype = self.w2.dtype
        return _gated_down(self.w1(rows), self.w3(rows), self.w2.kernel[...].astype(dtype)).reshape(x.shape)


@jax.checkpoint
def _gated_down(a: jax.Array, b: jax.Array, w2: jax.Array) -> jax.Array:
    """(silu(a) * b) @ w2, the gate recomputed in the backward: the layer scan then keeps the two
    up-projections only, not also the sigmoid, the gate and its product (each [tokens, hidden])."""
    return (jax.nn.silu(a) * b).astype(w2.dtype) @ w2


class Block(nnx.Module):
    """One decoder block: post-norm DeepNet (`deepnorm`) or pre-norm RMSNorm (`rmsnorm`)."""

    def __init__(self, cfg: ModelSpec, attn: Backend, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.deepnorm = cfg.norm_type == "deepnorm"
        self.alpha = deepnorm_alpha(cfg.n_layers)
        self.attn = Attention(cfg, attn, dtype, rngs)
        self.mlp = SwiGLU(cfg, dtype, rngs)
        norm = LayerNorm if self.deepnorm else RMSNorm
        self.norm1 = norm(cfg.dim)
        self.norm2 = norm(cfg.dim)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        if self.deepnorm:
            x = self.norm1(self.alpha * x + self.attn(x, positions, segment_ids))
            return self.norm2(self.alpha * x + self.mlp(x))
        x = x + self.attn(self.norm1(x), positions, segment_ids)
        return x + self.mlp(self.norm2(x))

    def cached(self, x: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        if self.deepnorm:
            a, cache = self.attn.cached(x, start, cache)
            x = self.norm1(self.alpha * x + a)
            return self.norm2(self.alpha * x + self.mlp(x)), cache
        a, cache = self.attn.cached(self.norm1(x), start, cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache


class Llama(nnx.Module):
    """Token ids `[batch, seq]` -> float32 logits `[batch, seq, VOCAB_SIZE]` (and final hidden states).

    `attn` overrides the backend `cfg.attention` names (tests and `verify` compare backends)."""

    def __init__(self, cfg: ModelSpec, rngs: nnx.Rngs, attn: Backend | None = None):
        # Parameters are born unplaced; training/build.py puts the state on the mesh by its logical names.
        with nnx.use_eager_sharding(False):
            self.cfg = cfg
            self.dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
            attn = attn or attention.backend(cfg.attention)
            embed_init = nnx.with_partitioning(nnx.initializers.normal(cfg.embed_init_std), ("vocab", "embed"))
            self.embed = nnx.Param(embed_init(rngs.params(), (VOCAB_SIZE, cfg.dim), jnp.float32))

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r: nnx.Rngs) -> Block:
                return Block(cfg, attn, self.dtype, r)

            self.blocks = make_blocks(rngs)
            self.final_norm = RMSNorm(cfg.dim)

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        b, l = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(h, positions, segment_ids), None

        if self.cfg.remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, state, unroll=min(self.cfg.scan_unroll, self.cfg.n_layers))
        return self.final_norm(x)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens, segment_ids))

    def logits(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("bld,vd->blv", h, self.embed[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """Empty KV cache `[n_layers, batch, max_len, n_kv_heads, head_dim]` (keys, values)."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def cached(self, tokens: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits of `tokens` placed at positions start.. after the cached prefix, and the new cache.

        A prompt is one call from start 0 (prefill); each generated token is one more call, so
        generating n tokens costs n single-token steps rather than n full forwards.
        """
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, layer: tuple[nnx.State, jax.Array, jax.Array]) -> tuple[jax.Array, KVCache]:
            layer_state, ck, cv = layer
            h, (ck, cv) = nnx.merge(graphdef, layer_state).cached(h, start, (ck, cv))
            return h, (ck, cv)

        x, new_cache = jax.lax.scan(body, x, (state, cache[0], cache[1]))
        return self.logits(self.final_norm(x)), new_cache
