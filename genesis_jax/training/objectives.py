"""The multi-task objectives (docs/design.md, "Multi-task learning"):
- coherence: are verses A and B consecutive (key + 1, same locale)? BCE on the head's logit;
- cross_ref: triplet max(0, cos(a, neg) - cos(a, pos) + margin) on projections; positive within
  +-window keys of the anchor (not itself), negative at least min_distance keys away;
- paraphrase: same key in two different locales (positive) or different keys (negative);
  logit = scale * cos of projections, BCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config.schema import MTLConfig
from ..data.device import DeviceCorpus
from ..data.sampler import verse_tokens
from ..data.verses import COHERENCE, CROSS_REF, VerseIndex, coherence_examples, cross_ref_examples, paraphrase_examples
from ..model.heads import MultiTaskLlama, _cos, pooled


def _bce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    losses = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    w = weight.astype(jnp.float32)
    acc = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    return (losses * w).sum() / jnp.maximum(w.sum(), 1.0), (acc * w).sum() / jnp.maximum(w.sum(), 1.0)


def task_loss(
    model: MultiTaskLlama, task: int, corpus: DeviceCorpus, idx: VerseIndex, key: jax.Array, n: int, cfg: MTLConfig
) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) of one auxiliary micro-batch of n examples built from `key`."""
    heads = model.heads

    def embed(*recs: jax.Array) -> list[jax.Array]:
        """Pooled states of each group of verses, from one forward pass over all of them."""
        ids, valid = verse_tokens(corpus, idx, jnp.concatenate(recs), cfg.max_len)
        return jnp.split(pooled(model.hidden(ids), valid), len(recs))

    if task == COHERENCE:
        a, b, label = coherence_examples(idx, key, n)
        return _bce(heads.coherence(*embed(a, b)), label, jnp.ones_like(label))
    if task == CROSS_REF:
        a, p, q, valid = cross_ref_examples(idx, key, n, cfg.cross_ref_window, cfg.cross_ref_min_distance)
        za, zp, zn = (heads.cross_ref(z) for z in embed(a, p, q))
        cp, cn = _cos(za, zp), _cos(za, zn)
        w = valid.astype(jnp.float32)
        loss = (jnp.maximum(0.0, cn - cp + cfg.triplet_margin) * w).sum() / jnp.maximum(w.sum(), 1.0)
        return loss, ((cp > cn).astype(jnp.float32) * w).sum() / jnp.maximum(w.sum(), 1.0)
    a, b, label, valid = paraphrase_examples(idx, key, n)
    za, zb = (heads.paraphrase(z) for z in embed(a, b))
    logits = cfg.paraphrase_scale * _cos(za, zb)
    return _bce(logits, label, valid)
