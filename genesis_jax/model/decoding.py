"""Sampling from a trained model with a KV cache (the library side of `python -m genesis_jax.generate`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core.errors import UserError
from ..core.tokenizer import BYTE_OFFSET, VOCAB_SIZE
from .llama import KVCache, Llama
from .memory import check_generation


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """One byte token per row: greedy at temperature 0, else softmax sampling after top-k and
    top-p (nucleus) filtering; special ids are never produced."""
    logits = logits.astype(jnp.float32).at[:, :BYTE_OFFSET].set(-jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending; top-k masking keeps it sorted
    k = jnp.where(top_k > 0, jnp.minimum(top_k, VOCAB_SIZE - BYTE_OFFSET), VOCAB_SIZE)
    kth = order[:, k - 1][:, None]
    order = jnp.where(order >= kth, order, -jnp.inf)
    probs = jax.nn.softmax(order, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1  # keep while mass before < p
    cutoff = jnp.maximum(jnp.take_along_axis(order, jnp.maximum(cutoff_idx, 0), axis=-1), kth)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature <= 0.0, greedy, sampled).astype(jnp.int32)


def generate(
    model: Llama,
    prompt: bytes,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: list[str | bytes] | None = None,
    seed: int = 0,
    num_samples: int = 1,
) -> list[bytes]:
    """Continue `prompt` with a KV cache; each sample stops at its first stop sequence (which is
    cut off) or after `max_tokens` bytes."""
    if not prompt:
        raise UserError("--prompt must not be empty")
    ids = np.frombuffer(prompt, np.uint8).astype(np.int32) + BYTE_OFFSET
    check_generation(model.cfg, num_samples, len(ids), max_tokens)  # before the cache is allocated
    tokens = jnp.asarray(np.tile(ids, (num_samples, 1)))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(num_samples, len(ids) + max_tokens)
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    @jax.jit
    def advance(
        params: nnx.State, toks: jax.Array, start: jax.Array, cache: KVCache, key: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        logits, cache = nnx.merge(graphdef, params).cached(toks, start, cache)
        return sample_logits(logits[:, -1], key, *knobs), cache

    base = jax.random.key(seed)
    stops = [s if isinstance(s, bytes) else s.encode("utf-8") for s in (stop or []) if s]
    out = [bytearray() for _ in range(num_samples)]
    done = np.zeros(num_samples, bool)
    nxt, cache = advance(params, tokens, jnp.int32(0), cache, jax.random.fold_in(base, 0))
    for t in range(max_tokens):
        host = np.asarray(nxt)
        for i in range(num_samples):
            if done[i]:
                continue
            out[i].append(int(host[i]) - BYTE_OFFSET)
            hit = [bytes(out[i]).find(s) for s in stops if s in out[i]]
            if hit:
                del out[i][min(hit) :]
                done[i] = True
        if done.all() or t == max_tokens - 1:
            break
        nxt, cache = advance(params, nxt[:, None], jnp.int32(len(ids) + t), cache, jax.random.fold_in(base, t + 1))
    return [bytes(o) for o in out]
