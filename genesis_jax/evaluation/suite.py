"""The evaluation suite: validation, masked reconstruction, cross-lingual alignment (what each
result means and how it is gated: metrics.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ..config.schema import Config
from ..core.tokenizer import BYTE_OFFSET, PAD_ID
from ..corpus.store import Corpus
from ..data.host import Streams, ValWindows, val_windows
from ..data.masks import MaskParams, make_mask
from ..model.heads import pooled
from ..model.loss import make_eval_step
from ..parallel.sharding import put, replicated
from .metrics import VERSE, reconstruction_kinds
from .similarity import char_error_rate, linear_cka, procrustes_residual, retrieval_top1

NEWLINE = ord("\n")
RECONSTRUCTION_SEED = 1234  # the same masks at every evaluation, so scores compare across steps


WindowLossFn = Callable[[nnx.State, jax.Array, jax.Array], jax.Array]


def window_losses(
    fn: WindowLossFn, params: nnx.State, w: ValWindows, batch: int, sharding: jax.sharding.Sharding | None = None
) -> np.ndarray:
    """Per-window mean cross-entropy, in fixed-size batches (the last one wraps around and its
    extra rows are dropped), so every call reuses one compiled shape."""
    n = len(w.locale)
    out = []
    for lo in range(0, n, batch):
        idx = np.arange(lo, lo + batch) % n
        x, y = w.inputs[idx], w.labels[idx]
        if sharding is not None:
            x, y = put(x, sharding), put(y, sharding)
        out.append(np.asarray(fn(params, x, y))[: min(batch, n - lo)])
    return np.concatenate(out) if out else np.zeros(0)


def ce_summary(per: np.ndarray, w: ValWindows, prefix: str = "val") -> dict[str, float]:
    """Global and per-locale cross-entropy, perplexity and bits per byte."""
    if not len(per):
        return {}
    out = {f"{prefix}/loss": float(per.mean())}
    for i, loc in enumerate(w.locales):
        if np.any(w.locale == i):
            out[f"{prefix}/loss/{loc}"] = float(per[w.locale == i].mean())
    for key in list(out):
        out[key.replace("/loss", "/ppl", 1)] = math.exp(min(out[key], 50.0))
        out[key.replace("/loss", "/bpb", 1)] = out[key] / math.log(2.0)
    return out


def jit_validation_step(
    graphdef: nnx.GraphDef,
    sharding: jax.sharding.Sharding | None = None,
    params_sharding: Any = None,
    out_sharding: jax.sharding.Sharding | None = None,
) -> jax.stages.Wrapped:
    """The jitted per-window loss of validation; explicit shardings when `params_sharding` is given
    (shared with `plan`, which compiles it for a GPU)."""
    explicit = (
        {}
        if params_sharding is None
        else {"in_shardings": (params_sharding, sharding, sharding), "out_shardings": out_sharding}
    )
    return jax.jit(make_eval_step(graphdef), **explicit)


class Validator:
    """Scores fixed held-out windows: global and per-locale CE, perplexity, bits per byte."""

    def __init__(
        self,
        windows: ValWindows,
        batch_size: int,
        graphdef: nnx.GraphDef,
        sharding: jax.sharding.Sharding | None = None,
        params_sharding: Any = None,
        out_sharding: jax.sharding.Sharding | None = None,
    ):
        """`sharding`: of a batch of windows; with `params_sharding` and `out_sharding` (the
        training state's, and a replicated one on its mesh) the step has explicit shardings."""
        self.w, self.batch, self.sharding = windows, batch_size, sharding
        self.fn = jit_validation_step(graphdef, sharding, params_sharding, out_sharding)

    def __call__(self, params: nnx.State) -> dict[str, float]:
        return ce_summary(window_losses(self.fn, params, self.w, self.batch, self.sharding), self.w)


class EvalSuite:
    def __init__(
        self,
        cfg: Config,
        corpus: Corpus,
        locales: list[str],
        graphdef: nnx.GraphDef,
        streams: Streams | None = None,
        mesh: Mesh | None = None,
    ):
        """`streams`: (train, held-out) results of `corpus.stream` when the caller has them.
        `mesh`: the parameters' mesh during training; inputs and results are then replicated
        on it, so every process of a multi-process run computes and reads the same numbers."""
        self.cfg, self.corpus, self.locales, self.graphdef = cfg, corpus, locales, graphdef
        self.train, self.heldout = streams or (
            corpus.stream(locales, heldout=False),
            corpus.stream(locales, heldout=True),
        )
        self.everywhere = None if mesh is None else replicated(mesh)
        out = {} if self.everywhere is None else {"out_shardings": self.everywhere}
        self.ce = jax.jit(make_eval_step(graphdef), **out)
        self.predict = jax.jit(lambda p, x: jnp.argmax(nnx.merge(graphdef, p)(x), axis=-1), **out)
        self.pooled = jax.jit(lambda p, x, valid: pooled(nnx.merge(graphdef, p).hidden(x), valid), **out)
        self.mask_fn = jax.jit(make_mask)  # no parameters: each process draws the same masks itself

    def place(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x) if self.everywhere is None else put(np.asarray(x), self.everywhere)

    # -- cross-entropy --------------------------------------------------------------------
    def cross_entropy(self, params: nnx.State, per_locale: int) -> dict[str, float]:
        """Held-out CE, perplexity and bits per byte (global and per locale), and the training
        split's CE on as many windows, for the train/validation gap."""
        L, batch = self.cfg.data.seq_len, self.cfg.training.batch_size
        vt, _, vs = self.heldout
        w = val_windows(vt, vs, self.locales, L, per_locale)
        out = ce_summary(window_losses(self.ce, params, w, batch, self.everywhere), w)
        tt, _, ts = self.train
        train = window_losses(self.ce, params, val_windows(tt, ts, self.locales, L, per_locale), batch, self.everywhere)
        if len(train):
            out["train/loss"] = float(train.mean())
            if "val/loss" in out:
                out["gap/val_minus_train"] = out["val/loss"] - out["train/loss"]
        return out

    # -- masked reconstruction --------------------------------------------------------------
    def _windows(self, per_locale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held-out windows of L bytes with their word starts, evenly spaced in each locale."""
        tokens, words, starts = self.heldout
        w = val_windows(tokens, starts, self.locales, self.cfg.data.seq_len, per_locale, words=words)
        assert w.words is not None
        return w.inputs, w.words, w.locale

    @staticmethod
    def verse_mask(ids: np.ndarray) -> np.ndarray:
        """Mask the first verse that lies wholly inside each window (between two newlines); if
        none does, everything after the first newline."""
        mask = np.zeros(ids.shape, bool)
        for r, row in enumerate(ids):
            nl = np.flatnonzero(row == NEWLINE + BYTE_OFFSET)
            if len(nl) >= 2:
                mask[r, nl[0] + 1 : nl[1]] = True
            elif len(nl) == 1:
                mask[r, nl[0] + 1 :] = True
            else:
                mask[r, 1:] = True
        return mask

    def reconstruction(self, params: nnx.State, per_locale: int) -> dict[str, float]:
        """Accuracy and character error rate of the original byte at each masked position,
        predicted from the corrupted history (the logits one position earlier)."""
        ids, words, _ = self._windows(per_locale)
        if not len(ids):
            return {}
        e = self.cfg.eval
        out: dict[str, float] = {}
        key = jax.random.key(RECONSTRUCTION_SEED)
        masks = {
            kind: np.array(
                self.mask_fn(key, jnp.asarray(words), MaskParams.make(kind, e.mask_prob, e.span_len, e.span_len))
            )
            for kind in reconstruction_kinds()[:-1]
        }
        masks[VERSE] = self.verse_mask(ids)
        batch = self.cfg.training.batch_size
        for kind, mask in masks.items():
            mask[:, 0] = False  # the first byte has no history to predict it from
            corrupted = np.where(mask, self.cfg.data.mask_id, ids)
            preds = np.concatenate(
                [
                    np.asarray(self.predict(params, self.place(corrupted[lo : lo + batch])))
                    for lo in range(0, len(ids), batch)
                ]
            )
            pred_at = np.zeros_like(ids)
            pred_at[:, 1:] = preds[:, :-1]  # prediction for position t comes from position t - 1
            hits = (pred_at == ids)[mask]
            out[f"recon/{kind}/accuracy"] = float(hits.mean()) if hits.size else 0.0
            out[f"recon/{kind}/cer"] = char_error_rate(self._spans(pred_at, ids, mask))
            out[f"recon/{kind}/masked_fraction"] = float(mask.mean())
        return out

    @staticmethod
    def _spans(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> list[tuple[str, str]]:
        pairs = []
        for p_row, r_row, m_row in zip(pred, ref, mask):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], m_row.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                dec = lambda x: bytes(np.clip(x - BYTE_OFFSET, 0, 255).astype(np.uint8)).decode("utf-8", "replace")  # noqa: E731
                pairs.append((dec(p_row[a:b]), dec(r_row[a:b])))
        return pairs

    # -- cross-lingual alignment ------------------------------------------------------------
    def embed(self, params: nnx.State, texts: list[bytes]) -> np.ndarray:
        """Mean-pooled final hidden states over each text's bytes (padding excluded)."""
        n = min(self.cfg.eval.embed_len, max((len(t) for t in texts), default=1))  # longer would be padding only
        ids = np.full((len(texts), n), PAD_ID, np.int32)
        for i, t in enumerate(texts):
            b = np.frombuffer(t[:n], np.uint8)
            ids[i, : len(b)] = b.astype(np.int32) + BYTE_OFFSET
        valid = ids != PAD_ID
        b = self.cfg.training.batch_size
        return np.concatenate(
            [
                np.asarray(
                    self.pooled(params, self.place(ids[lo : lo + b]), self.place(valid[lo : lo + b])), np.float64
                )
                for lo in range(0, len(ids), b)
            ]
        )

    def alignment(self, params: nnx.State, n_keys: int) -> dict[str, float]:
        """For held-out keys present in every locale: top-1 retrieval of the same verse across
        each pair of locales (both directions), orthogonal-Procrustes residual and linear CKA."""
        c = self.corpus
        by_key: dict[int, dict[str, int]] = {}
        for row_i in np.flatnonzero(c.records["heldout"] == 1):
            r = c.records[row_i]
            by_key.setdefault(int(r["key"]), {})[c.locales[int(r["locale"])]] = int(row_i)
        keys = sorted(k for k, locs in by_key.items() if all(loc in locs for loc in self.locales))
        if len(self.locales) < 2 or len(keys) < 2:
            return {}
        keys = keys[:: max(1, len(keys) // n_keys)][:n_keys]
        emb = {
            loc: self.embed(params, [c.record_text(by_key[k][loc]).encode("utf-8") for k in keys])
            for loc in self.locales
        }
        out: dict[str, float] = {"align/keys": float(len(keys))}
        accs, res, ckas = [], [], []
        for a, b in itertools.combinations(self.locales, 2):
            acc = 0.5 * (retrieval_top1(emb[a], emb[b]) + retrieval_top1(emb[b], emb[a]))
            out[f"align/top1/{a}-{b}"] = acc
            accs.append(acc)
            res.append(procrustes_residual(emb[a], emb[b]))
            ckas.append(linear_cka(emb[a], emb[b]))
        out.update(
            {
                "align/top1": float(np.mean(accs)),
                "align/procrustes": float(np.mean(res)),
                "align/cka": float(np.mean(ckas)),
                "align/chance": 1.0 / len(keys),
            }
        )
        return out

    # -- suites ---------------------------------------------------------------------------
    def run(self, params: nnx.State, quick: bool) -> dict[str, float]:
        e = self.cfg.eval
        scale = 4 if quick else 1
        out = self.cross_entropy(params, max(1, e.val_windows // scale))
        out.update(self.reconstruction(params, max(1, e.reconstruction_windows // scale)))
        # Alignment uses the same keys in both suites, so its threshold means the same thing.
        out.update(self.alignment(params, e.alignment_keys))
        return out
