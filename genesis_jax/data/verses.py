"""The verse index of multi-task learning: the training split's records on the device, and the
examples each task draws from it (consecutive pairs, cross-references, paraphrases across
locales). Also the task ids and names every other part uses."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config.schema import MTLConfig
from ..core.errors import ConfigError
from ..corpus.store import Corpus

LM, COHERENCE, CROSS_REF, PARAPHRASE = 0, 1, 2, 3


TASK_IDS = (LM, COHERENCE, CROSS_REF, PARAPHRASE)  # the branch order of the step's task switch


TASK_NAMES = ("lm", "coherence", "cross_ref", "paraphrase")


N_TASKS = len(TASK_IDS)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class VerseIndex:
    """The training split's records, addressing the device byte stream."""

    start: jax.Array  # [R] int32 offset of each record's first byte in DeviceCorpus.tokens
    length: jax.Array  # [R] int32 bytes (without the separator)
    locale: jax.Array  # [R] int32
    key: jax.Array  # [R] int32 index into the corpus's sorted key list
    loc_first: jax.Array  # [n_locales + 1] int32: records of locale i are loc_first[i]:loc_first[i+1]
    next_rec: jax.Array  # [R] int32 record of key + 1 in the same locale, or -1
    has_next: jax.Array  # [H] int32 records whose next_rec exists
    key_rec: jax.Array  # [n_locales, n_keys] int32 record of (locale, key), or -1


def build_verse_index(corpus: Corpus, locales: list[str], locale_starts: np.ndarray) -> VerseIndex:
    """Training records of `locales` in stream order (as `Corpus.stream` lays them out)."""
    loc_of = {loc: i for i, loc in enumerate(corpus.locales)}
    starts, lengths, locs, keys, first = [], [], [], [], [0]
    for i, loc in enumerate(locales):
        recs = corpus.records[(corpus.records["locale"] == loc_of[loc]) & (corpus.records["heldout"] == 0)]
        ln = recs["length"].astype(np.int64)
        starts.append(int(locale_starts[i]) + np.concatenate([[0], np.cumsum(ln + 1)[:-1]]))
        lengths.append(ln)
        locs.append(np.full(len(recs), i))
        keys.append(recs["key"].astype(np.int64))
        first.append(first[-1] + len(recs))
    start, length = np.concatenate(starts), np.concatenate(lengths)
    locale, key = np.concatenate(locs), np.concatenate(keys)
    n_keys = len(corpus.keys)
    key_rec = np.full((len(locales), n_keys), -1, np.int64)
    key_rec[locale, key] = np.arange(len(key))
    succ = np.where(key + 1 < n_keys, key_rec[locale, np.minimum(key + 1, n_keys - 1)], -1)
    next_rec = np.where(key + 1 < n_keys, succ, -1)
    arrays = dict(
        start=start,
        length=length,
        locale=locale,
        key=key,
        loc_first=np.array(first),
        next_rec=next_rec,
        has_next=np.flatnonzero(next_rec >= 0),
        key_rec=key_rec,
    )
    return VerseIndex(**{k: jnp.asarray(v, jnp.int32) for k, v in arrays.items()})


def check_possible(mtl: MTLConfig, idx: VerseIndex, locales: list[str]) -> None:
    """A task in the mixture that this corpus cannot give one example of is refused at start
    (it would log 0 forever): paraphrase needs a key in two locales, coherence two consecutive
    keys, cross_ref a key at least cross_ref_min_distance keys from another."""
    key_rec = np.asarray(idx.key_rec)
    shared = int(((key_rec >= 0).sum(axis=0) >= 2).sum())
    keys, locs = np.asarray(idx.key), np.asarray(idx.locale)
    spread = max((int(keys[locs == i].max() - keys[locs == i].min()) for i in np.unique(locs)), default=0)
    where = f"the training split of {', '.join(locales)}"
    if mtl.paraphrase_weight > 0 and shared == 0:
        raise ConfigError(
            f"mtl.paraphrase_weight = {mtl.paraphrase_weight}: paraphrase pairs need one key in two locales, "
            f"and {where} has none; set it to 0 or train on more locales"
        )
    if mtl.coherence_weight > 0 and int(np.asarray(idx.has_next).size) == 0:
        raise ConfigError(
            f"mtl.coherence_weight = {mtl.coherence_weight}: coherence needs two consecutive keys in a "
            f"locale, and {where} has none; set it to 0"
        )
    if mtl.cross_ref_weight > 0 and spread < mtl.cross_ref_min_distance:
        raise ConfigError(
            f"mtl.cross_ref_min_distance = {mtl.cross_ref_min_distance}: {where} spans {spread} keys, so "
            "cross_ref has no negatives; lower it or set mtl.cross_ref_weight = 0"
        )


def _random_in_locale(idx: VerseIndex, key: jax.Array, loc: jax.Array) -> jax.Array:
    lo, hi = idx.loc_first[loc], idx.loc_first[loc + 1]
    return lo + jax.random.randint(key, loc.shape, 0, jnp.maximum(hi - lo, 1))


def coherence_examples(idx: VerseIndex, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(a, b, label): the first half consecutive pairs, the second half a random other verse."""
    ka, kb = jax.random.split(key)
    a = idx.has_next[jax.random.randint(ka, (n,), 0, idx.has_next.shape[0])]
    loc = idx.locale[a]
    lo, count = idx.loc_first[loc], idx.loc_first[loc + 1] - idx.loc_first[loc]
    rand = _random_in_locale(idx, kb, loc)
    clash = (rand == idx.next_rec[a]) | (rand == a)
    rand = jnp.where(clash, lo + (rand - lo + 2) % jnp.maximum(count, 1), rand)
    label = (jnp.arange(n) < n // 2).astype(jnp.float32)
    return a, jnp.where(label > 0, idx.next_rec[a], rand), label


def cross_ref_examples(
    idx: VerseIndex, key: jax.Array, n: int, window: int, min_distance: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(anchor, positive, negative, valid): positive 1..window keys away (either side),
    negative at least min_distance records (hence keys) away in the same locale."""
    ka, kd, ks, kn = jax.random.split(key, 4)
    a = jax.random.randint(ka, (n,), 0, idx.locale.shape[0])
    loc, k = idx.locale[a], idx.key[a]
    d = jax.random.randint(kd, (n,), 1, window + 1) * jnp.where(jax.random.bernoulli(ks, 0.5, (n,)), 1, -1)
    n_keys = idx.key_rec.shape[1]
    pos, found = jnp.full((n,), -1), jnp.zeros((n,), bool)
    for off in (d, -d, jnp.ones_like(d), -jnp.ones_like(d)):  # held-out neighbours: try the others
        cand_key = k + off
        ok = (cand_key >= 0) & (cand_key < n_keys)
        cand = jnp.where(ok, idx.key_rec[loc, jnp.clip(cand_key, 0, n_keys - 1)], -1)
        take = (~found) & (cand >= 0)
        pos, found = jnp.where(take, cand, pos), found | take
    lo, count = idx.loc_first[loc], idx.loc_first[loc + 1] - idx.loc_first[loc]
    spread = jnp.maximum(count - 2 * min_distance, 1)
    neg = lo + (a - lo + min_distance + jax.random.randint(kn, (n,), 0, 2**30) % spread) % jnp.maximum(count, 1)
    valid = found & (count > 2 * min_distance)
    return a, jnp.maximum(pos, 0), neg, valid


def paraphrase_examples(idx: VerseIndex, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(a, b, label, valid): b is the same key in another locale (first half) or another key."""
    ka, kl, kr = jax.random.split(key, 3)
    n_loc = idx.key_rec.shape[0]
    a = jax.random.randint(ka, (n,), 0, idx.locale.shape[0])
    loc, k = idx.locale[a], idx.key[a]
    other = (loc + jax.random.randint(kl, (n,), 1, max(n_loc, 2))) % n_loc
    same_key = idx.key_rec[other, k]
    rand = _random_in_locale(idx, kr, other)
    lo, count = idx.loc_first[other], idx.loc_first[other + 1] - idx.loc_first[other]
    rand = jnp.where(idx.key[rand] == k, lo + (rand - lo + 1) % jnp.maximum(count, 1), rand)
    label = (jnp.arange(n) < n // 2).astype(jnp.float32)
    b = jnp.where(label > 0, jnp.maximum(same_key, 0), rand)
    valid = (n_loc > 1) & jnp.where(label > 0, same_key >= 0, count > 1)
    return a, b, label, valid
