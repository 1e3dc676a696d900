"""Schedule against hand-computed values, decay mask, the stun multiplier as a runtime argument."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from genesis_jax import config as C
from genesis_jax.data.device import build_device_corpus
from genesis_jax.data.masks import MaskParams
from genesis_jax.parallel.sharding import make_mesh
from genesis_jax.training.optim import decay_mask, lr_schedule
from genesis_jax.training.state import init_model, init_state
from genesis_jax.training.step import StepControls, make_train_step


def test_warmup_then_cosine_hand_computed():
    o = C.OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    f = lr_schedule(o, max_steps=14)
    # Step 0 is warmed up: lr * (s + 1) / (warmup + 1).
    want = {
        0: 0.2,
        1: 0.4,
        2: 0.6,
        3: 0.8,
        4: 1.0,
        9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
        14: 0.1,
        20: 0.1,
    }
    for s, v in want.items():
        assert float(f(s)) == pytest.approx(v, rel=1e-6), s
    const = lr_schedule(C.OptimConfig(lr=0.5, warmup_steps=1, schedule="constant"), max_steps=10)
    assert [float(const(s)) for s in (0, 1, 9)] == pytest.approx([0.25, 0.5, 0.5])


def test_decay_mask_matrices_only():
    cfg = C.from_dict({"model": {"preset": "test"}})
    params = init_state(cfg, init_model(cfg)).params
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params, decay_embedding=False))[0]
    by_name = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in flat}
    assert all(v for n, v in by_name.items() if n.endswith("kernel"))
    assert not any(v for n, v in by_name.items() if "norm" in n or n.startswith("embed"))
    flat_e = jax.tree_util.tree_flatten_with_path(decay_mask(params, decay_embedding=True))[0]
    assert any(v for path, v in flat_e if str(getattr(path[0], "key", path[0])) == "embed")


@pytest.fixture(scope="module")
def stepper(fixture_corpus):
    from flax import nnx

    from genesis_jax.corpus.store import open_corpus

    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32"},
            "data": {"seq_len": 16},
            "training": {"batch_size": 4, "max_steps": 10},
            "optim": {"warmup_steps": 0, "weight_decay": 0.0},
        }
    )
    c = open_corpus(fixture_corpus)
    dc = build_device_corpus(*c.stream(c.locales, heldout=False), 16)
    model = init_model(cfg)
    traces = []
    raw = make_train_step(cfg, nnx.graphdef(model), make_mesh())

    def counted(*args):
        traces.append(1)
        return raw(*args)

    replicated = NamedSharding(make_mesh(), P())

    def fresh_state():
        # Placed as the train loop places it, so the step's output state matches its input.
        return jax.device_put(init_state(cfg, model), replicated)

    return cfg, fresh_state, dc, jax.jit(counted), traces


def test_multiplier_is_runtime_one_trace_and_zero_freezes(stepper):
    cfg, fresh_state, dc, step, traces = stepper
    key = jax.random.key(0)
    state = fresh_state()
    before = jax.tree.map(np.asarray, state.params)
    schedule = lr_schedule(cfg.optim, cfg.training.max_steps)
    for i, mult in enumerate((1.0, 0.5, 0.25, 0.0)):
        state, m = step(state, dc, key, StepControls.make(mult, mask=MaskParams.make("random", 0.1)))
        assert float(m["lr"]) == pytest.approx(float(schedule(i)) * mult)
    assert len(traces) == 1
    frozen = fresh_state()
    after, _ = step(frozen, dc, key, StepControls.make(0.0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, after.params)
    assert len(traces) == 1


def _adam_mu(opt_state):
    import optax

    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1
    return found[0].mu


def test_stun_scales_adam_first_moment_without_retracing(stepper):
    cfg, fresh_state, dc, step, traces = stepper
    key = jax.random.key(0)
    state, _ = step(fresh_state(), dc, key, StepControls.make())
    mu_old = jax.tree.map(np.asarray, _adam_mu(state.opt_state))
    one, _ = step(state, dc, key, StepControls.make(1.0, 1.0))
    step(state, dc, key, StepControls.make(0.5, 0.5, MaskParams.make("span", 0.2, 1, 3)))  # other mask: no retrace
    # Same step index and mask, so the same batch and gradient:
    # mu_new = b1 * scale * mu_old + (1 - b1) * g, so the difference is b1 * (1 - 0.5) * mu_old.
    b1 = cfg.optim.beta1
    same, _ = step(state, dc, key, StepControls.make(0.5, 0.5))
    for m1, ms, m0 in zip(
        jax.tree.leaves(_adam_mu(one.opt_state)), jax.tree.leaves(_adam_mu(same.opt_state)), jax.tree.leaves(mu_old)
    ):
        np.testing.assert_allclose(np.asarray(m1) - np.asarray(ms), b1 * 0.5 * m0, rtol=1e-4, atol=1e-8)
    assert len(traces) == 1


@pytest.mark.parametrize("decay_embedding", [False, True])
def test_two_train_steps_are_adamw_in_float64(fixture_corpus, decay_embedding):
    """The parameters after two train steps against AdamW written out in float64 NumPy: global
    norm clipping, Adam moments with bias correction, eps outside the root, decoupled weight
    decay on linear kernels only (and the embedding when asked), the warmup/cosine rate times
    the stun's multiplier, and the stun's first-moment scale before the second update."""
    from flax import nnx

    from genesis_jax.corpus.store import open_corpus
    from genesis_jax.data.sampler import lm_batch
    from genesis_jax.model.loss import make_loss_fn

    o = dict(
        lr=0.01,
        warmup_steps=1,
        min_lr_ratio=0.2,
        beta1=0.8,
        beta2=0.9,
        eps=1e-6,
        weight_decay=0.3,
        decay_embedding=decay_embedding,
        grad_clip=0.05,
    )
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32", "n_layers": 1},
            "data": {"seq_len": 16},
            "training": {"batch_size": 2, "max_steps": 5},
            "optim": o,
        }
    )
    c = open_corpus(fixture_corpus)
    dc = build_device_corpus(*c.stream(c.locales, heldout=False), 16)
    model = init_model(cfg)
    graphdef = nnx.graphdef(model)
    state = jax.device_put(init_state(cfg, model), NamedSharding(make_mesh(), P()))
    step = jax.jit(make_train_step(cfg, graphdef, make_mesh()))
    loss = make_loss_fn(graphdef)
    key = jax.random.key(3)
    controls = [StepControls.make(1.0, 1.0), StepControls.make(0.5, 0.25)]

    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    decays = ["['kernel']" in n or (decay_embedding and n.startswith("['embed']")) for n in names]
    assert sum(decays) == 7 + decay_embedding and not any(d for n, d in zip(names, decays) if "norm" in n)
    f64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    mu = [np.zeros_like(p) for p in f64(state.params)]
    nu = [np.zeros_like(p) for p in f64(state.params)]
    for s, ctl in enumerate(controls):
        params = f64(state.params)
        batch = lm_batch(dc, jax.random.fold_in(key, s), 2, 16, ctl.mask)
        grads = f64(jax.grad(loss)(state.params, batch))
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        grads = [g * min(1.0, o["grad_clip"] / norm) for g in grads]
        lr = (
            o["lr"] * (s + 1) / 2 if s < 1 else o["lr"] * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4)))
        ) * float(ctl.lr_mult)
        state, m = step(state, dc, key, ctl)
        assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-4)
        t = s + 1
        for i, (p, g) in enumerate(zip(params, grads)):
            mu[i] = o["beta1"] * float(ctl.mu_scale) * mu[i] + (1 - o["beta1"]) * g
            nu[i] = o["beta2"] * nu[i] + (1 - o["beta2"]) * g * g
            update = (mu[i] / (1 - o["beta1"] ** t)) / (np.sqrt(nu[i] / (1 - o["beta2"] ** t)) + o["eps"])
            want = p - lr * (update + o["weight_decay"] * p * decays[i])
            got = np.asarray(jax.tree.leaves(state.params)[i], np.float64)
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want - p).max() + 1e-7, (s, names[i])
