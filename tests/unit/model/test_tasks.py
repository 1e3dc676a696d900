"""Multi-task examples are what they claim to be; the mixed step trains all heads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from genesis_jax import config as C
from genesis_jax.core.tokenizer import BYTE_OFFSET
from genesis_jax.corpus.store import open_corpus
from genesis_jax.data.device import build_device_corpus
from genesis_jax.data.sampler import verse_tokens
from genesis_jax.data.verses import (
    COHERENCE,
    CROSS_REF,
    PARAPHRASE,
    build_verse_index,
    coherence_examples,
    cross_ref_examples,
    paraphrase_examples,
)
from genesis_jax.parallel.sharding import make_mesh
from genesis_jax.training.objectives import task_loss
from genesis_jax.training.state import init_model, init_state
from genesis_jax.training.step import StepControls, make_train_step


@pytest.fixture(scope="module")
def setup(fixture_corpus):
    c = open_corpus(fixture_corpus)
    tokens, words, starts = c.stream(c.locales, heldout=False)
    dc = build_device_corpus(tokens, words, starts, 16)
    idx = build_verse_index(c, c.locales, starts)
    return c, dc, idx


def record_info(c, idx, recs):
    keys = np.asarray(idx.key)[recs]
    locs = np.asarray(idx.locale)[recs]
    return keys, locs


def test_index_addresses_the_training_stream(setup):
    c, dc, idx = setup
    ids, valid = verse_tokens(dc, idx, jnp.arange(idx.key.shape[0]), 128)
    for r in range(0, idx.key.shape[0], 17):
        text = bytes((np.asarray(ids[r])[np.asarray(valid[r])] - 4).astype(np.uint8)).decode()
        key = c.keys[int(idx.key[r])]
        loc = c.locales[int(idx.locale[r])]
        want = [
            c.record_text(i)
            for i, row in enumerate(c.records)
            if c.keys[row["key"]] == key and c.locales[row["locale"]] == loc
        ][0]
        assert text == want and not any(
            c.records[i]["heldout"] for i in range(len(c.records)) if c.keys[c.records[i]["key"]] == key
        )


def test_coherence_pairs(setup):
    c, _, idx = setup
    a, b, label = coherence_examples(idx, jax.random.key(0), 400)
    ka, la = record_info(c, idx, np.asarray(a))
    kb, lb = record_info(c, idx, np.asarray(b))
    pos = np.asarray(label) > 0
    assert pos.sum() == 200 and (la == lb).all()
    assert (kb[pos] == ka[pos] + 1).all()  # consecutive keys, same locale
    assert (kb[~pos] != ka[~pos] + 1).all() and (kb[~pos] != ka[~pos]).all()


def test_cross_ref_triplets(setup):
    c, _, idx = setup
    a, p, n, valid = cross_ref_examples(idx, jax.random.key(1), 400, window=5, min_distance=100)
    v = np.asarray(valid)
    assert v.mean() > 0.9
    ka, la = record_info(c, idx, np.asarray(a))
    kp, lp = record_info(c, idx, np.asarray(p))
    kn, ln = record_info(c, idx, np.asarray(n))
    d = np.abs(kp - ka)[v]
    assert (la == lp)[v].all() and (la == ln)[v].all()
    assert (d >= 1).all() and (d <= 5).all() and len(set(d.tolist())) > 2  # near, never itself
    assert (np.abs(kn - ka)[v] >= 100).all()


def test_paraphrase_pairs(setup):
    c, _, idx = setup
    a, b, label, valid = paraphrase_examples(idx, jax.random.key(2), 400)
    v = np.asarray(valid)
    ka, la = record_info(c, idx, np.asarray(a))
    kb, lb = record_info(c, idx, np.asarray(b))
    pos = (np.asarray(label) > 0) & v
    neg = (np.asarray(label) == 0) & v
    assert pos.sum() > 150 and neg.sum() > 150
    assert (ka[pos] == kb[pos]).all() and (la[pos] != lb[pos]).all()  # same verse, other language
    assert (ka[neg] != kb[neg]).all()


TASKS = ("lm", "coherence", "cross_ref", "paraphrase")
LOSS_WEIGHTS = dict(zip(TASKS, (2.0, 3.0, 5.0, 7.0)))  # distinct primes: a swap or an ignored weight shows


def _adam_first_moment(opt_state) -> dict:
    """Adam's `mu` as a flat {path: array}: after one update it is (1 - beta1) x the gradient, in
    full precision (the parameters' change would round it)."""
    adam = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(adam[0].mu)}


@pytest.fixture(scope="module")
def mixed_runs(setup):
    """Three steps of each step program, one compile each: the plain LM step, the multi-task
    step with the LM alone, a uniform task mixture, and that mixture with loss weights
    LOSS_WEIGHTS. Per run: the number of traces, each step's metrics, Adam's first moment after
    the first step, the final state."""
    c, _, _ = setup
    tokens, words, starts = c.stream(c.locales, heldout=False)
    base = {
        "model": {"preset": "test", "compute_dtype": "float32", "n_layers": 1},
        "data": {"seq_len": 16},
        "training": {"batch_size": 2, "grad_accum_steps": 8, "max_steps": 10},
        "optim": {"grad_clip": 0.0},
    }
    uniform = {
        "enabled": True,
        **{f"{t}_weight": 0.25 for t in TASKS},
        "max_len": 32,
        "head_dim": 16,
        "cross_ref_min_distance": 20,
    }
    mesh = make_mesh()
    rep = NamedSharding(mesh, P())
    results = {}
    for name, mtl in [
        ("plain", {"enabled": False}),
        ("lm_only", {"enabled": True, "coherence_weight": 0.0, "cross_ref_weight": 0.0, "paraphrase_weight": 0.0}),
        ("mixed", uniform),
        ("weighted", {**uniform, **{f"{t}_loss_weight": w for t, w in LOSS_WEIGHTS.items()}}),
    ]:
        cfg = C.from_dict({**base, "mtl": mtl})
        dc = build_device_corpus(tokens, words, starts, 16)
        if cfg.mtl.enabled:
            dc = dataclasses.replace(dc, verses=build_verse_index(c, c.locales, starts))
        model = init_model(cfg)
        traces = []
        raw = make_train_step(cfg, nnx.graphdef(model), mesh, n_locales=3)

        def counted(*args, raw=raw, traces=traces):
            traces.append(1)
            return raw(*args)

        step = jax.jit(counted)
        state = jax.device_put(init_state(cfg, model), rep)
        metrics, first_mu = [], None
        for _ in range(3):
            state, m = step(state, dc, jax.random.key(1), StepControls.make())  # seed 1: every task in step 0
            metrics.append(jax.device_get(m))
            first_mu = _adam_first_moment(state.opt_state) if first_mu is None else first_mu
        results[name] = {"traces": len(traces), "metrics": metrics, "first_mu": first_mu, "state": state}
    return results


def test_mixed_step_one_trace_and_lm_only_matches_plain(mixed_runs):
    assert all(r["traces"] == 1 for r in mixed_runs.values())
    plain, lm_only = mixed_runs["plain"]["metrics"], mixed_runs["lm_only"]["metrics"]
    np.testing.assert_allclose([m["loss"] for m in lm_only], [m["loss"] for m in plain], rtol=1e-5)
    mixed, state = mixed_runs["mixed"]["metrics"], mixed_runs["mixed"]["state"]
    counts = np.array([[m[f"task/{t}/count"] for t in TASKS] for m in mixed])
    assert (counts.sum(axis=1) == 8).all() and (counts[:, 1:].sum() > 0)
    cfg = C.from_dict({"model": {"preset": "test", "n_layers": 1}, "mtl": {"enabled": True, "head_dim": 16}})
    heads = jax.tree.leaves(nnx.state(init_model(cfg).heads))
    trained = jax.tree.leaves(state.params["heads"])
    assert any(not np.allclose(a, b) for a, b in zip(trained, heads))  # the heads were trained
    for m in mixed:
        for t in ("coherence", "cross_ref", "paraphrase"):
            if m[f"task/{t}/count"] > 0:
                assert np.isfinite(m[f"task/{t}/loss"]) and 0.0 <= m[f"task/{t}/acc"] <= 1.0


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(layer_in, layer_out, x: np.ndarray) -> np.ndarray:
    w = [np.asarray(p[...], np.float64) for p in (layer_in.kernel, layer_in.bias, layer_out.kernel, layer_out.bias)]
    return _gelu(x @ w[0] + w[1]) @ w[2] + w[3]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _bce_ref(logits: np.ndarray, labels: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    p = 1.0 / (1.0 + np.exp(-logits))
    loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    return (loss * w).sum() / w.sum(), (((logits > 0) == (labels > 0.5)) * w).sum() / w.sum()


def test_task_losses_match_a_per_verse_float64_reference(setup):
    """Verses embedded with random filler instead of padding, mean-pooled over their own bytes in
    float64; heads and losses recomputed in NumPy from the formulas in training/objectives.py's docstring."""
    c, dc, idx = setup
    dc = dataclasses.replace(dc, verses=idx)
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32"},
            "data": {"seq_len": 16},
            "mtl": {"enabled": True, "max_len": 48, "head_dim": 16, "cross_ref_min_distance": 20},
        }
    )
    m = cfg.mtl
    model = init_model(cfg)
    tokens = np.asarray(dc.tokens)
    start, length = np.asarray(idx.start), np.asarray(idx.length)
    assert (length < m.max_len).any() and (length > m.max_len).any()  # both padding and truncation occur

    garbage = np.random.default_rng(0)

    def embed(recs) -> np.ndarray:
        # Filler after a verse is random bytes, not PAD: a causal model's pooled prefix ignores it.
        recs = np.asarray(recs)
        ids = garbage.integers(BYTE_OFFSET, BYTE_OFFSET + 256, (len(recs), m.max_len)).astype(np.int32)
        lens = np.minimum(length[recs], m.max_len)
        for i, r in enumerate(recs):
            ids[i, : lens[i]] = tokens[start[r] : start[r] + lens[i]].astype(np.int32) + BYTE_OFFSET
        hidden = np.asarray(model.hidden(jnp.asarray(ids)), np.float64)
        return np.stack([hidden[i, : lens[i]].mean(axis=0) for i in range(len(recs))])

    n, key = 16, jax.random.key(3)
    h = model.heads
    for task in (COHERENCE, CROSS_REF, PARAPHRASE):
        loss, acc = jax.jit(lambda k, task=task: task_loss(model, task, dc, idx, k, n, m))(key)
        if task == COHERENCE:
            a, b, label = coherence_examples(idx, key, n)
            logits = _mlp(h.coh_in, h.coh_out, np.concatenate([embed(a), embed(b)], axis=-1))[:, 0]
            want = _bce_ref(logits, np.asarray(label, np.float64), np.ones(n))
        elif task == CROSS_REF:
            a, p, q, valid = cross_ref_examples(idx, key, n, m.cross_ref_window, m.cross_ref_min_distance)
            za, zp, zn = (_mlp(h.xref_in, h.xref_out, embed(x)) for x in (a, p, q))
            cp, cn = _cosine(za, zp), _cosine(za, zn)
            w = np.asarray(valid, np.float64)
            assert w.sum() > 0
            want = ((np.maximum(0.0, cn - cp + m.triplet_margin) * w).sum() / w.sum(), ((cp > cn) * w).sum() / w.sum())
        else:
            a, b, label, valid = paraphrase_examples(idx, key, n)
            logits = m.paraphrase_scale * _cosine(
                _mlp(h.para_in, h.para_out, embed(a)), _mlp(h.para_in, h.para_out, embed(b))
            )
            want = _bce_ref(logits, np.asarray(label, np.float64), np.asarray(valid, np.float64))
        np.testing.assert_allclose(float(loss), want[0], rtol=1e-4, atol=1e-6, err_msg=f"task {task} loss")
        assert float(acc) == pytest.approx(want[1]), f"task {task} accuracy"


def test_each_task_loss_weight_scales_its_own_gradient(setup, mixed_runs):
    """The update's gradient is the mean over micro-batches of (weight of the micro-batch's task)
    x (gradient of its loss). Every task owns parameters no other task's loss reaches: its head,
    and for the LM the embedding rows of tokens that are never an input (the tied output layer
    alone trains them). With loss weights (2, 3, 5, 7) and the same draws as a run at weight 1,
    each owned gradient is its own task's weight times the unweighted one: any two weights swapped,
    or one ignored, fails. The reported task losses stay as they were (a weight is not a metric's)."""
    c, _, _ = setup
    tokens = c.stream(c.locales, heldout=False)[0]
    plain, weighted = mixed_runs["mixed"]["first_mu"], mixed_runs["weighted"]["first_mu"]
    m_plain, m_weighted = mixed_runs["mixed"]["metrics"][0], mixed_runs["weighted"]["metrics"][0]
    for t in TASKS:
        assert m_plain[f"task/{t}/count"] > 0 and m_plain[f"task/{t}/count"] == m_weighted[f"task/{t}/count"]
        assert float(m_weighted[f"task/{t}/loss"]) == pytest.approx(float(m_plain[f"task/{t}/loss"]), rel=1e-6)
    embed = next(k for k in plain if k.startswith("['embed']"))  # flax may add a `.value`
    seen = set(np.unique(tokens).astype(int) + BYTE_OFFSET) | {0, 1, 2, 3}  # specials may pad a task's input
    unseen = np.array(sorted(set(range(plain[embed].shape[0])) - seen))
    assert len(unseen) > 100
    owned = {
        "lm": [(embed, unseen)],
        "coherence": [(k, ...) for k in plain if "coh_" in k],
        "cross_ref": [(k, ...) for k in plain if "xref_" in k],
        "paraphrase": [(k, ...) for k in plain if "para_" in k],
    }
    for t, parts in owned.items():
        assert parts
        for key, rows in parts:
            want = LOSS_WEIGHTS[t] * plain[key][rows]
            assert np.abs(want).max() > 0, (t, key)
            np.testing.assert_allclose(
                weighted[key][rows], want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=f"{t}: {key}"
            )
