"""Generation: the KV cache against full recomputation, sampling filters, stop sequences, CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_small_run_config
from flax import nnx

from genesis_jax import config as C
from genesis_jax.model.decoding import generate, sample_logits
from genesis_jax.model.llama import Llama


@pytest.fixture(scope="module")
def model():
    cfg = C.from_dict({"model": {"preset": "test", "n_kv_heads": 2, "compute_dtype": "float32"}})
    return Llama(cfg.model, nnx.Rngs(3))


@pytest.mark.parametrize("norm", ["rmsnorm", "deepnorm"])
def test_cached_logits_equal_full_forward(norm):
    cfg = C.from_dict({"model": {"preset": "test", "n_kv_heads": 2, "compute_dtype": "float32", "norm_type": norm}})
    m = Llama(cfg.model, nnx.Rngs(0))
    toks = jnp.asarray(np.random.default_rng(0).integers(4, 260, size=(2, 12)), jnp.int32)
    cache = m.init_cache(2, 16)
    first, cache = m.cached(toks[:, :7], jnp.int32(0), cache)
    steps = [first]
    for t in range(7, 12):
        out, cache = m.cached(toks[:, t : t + 1], jnp.int32(t), cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), m(toks), rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_recomputing_every_step(model):
    prompt = b"In the beginning"
    got = generate(model, prompt, max_tokens=12, temperature=0.0)[0]
    ids = [int(x) for x in np.frombuffer(prompt, np.uint8).astype(np.int32) + 4]
    for _ in range(12):  # independent reference: a full forward of the whole sequence each step
        logits = np.array(model(jnp.asarray([ids], jnp.int32)))[0, -1]
        logits[:4] = -np.inf
        ids.append(int(np.argmax(logits)))
    assert got == bytes([i - 4 for i in ids[len(prompt) :]])


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = b"Dieu dit"
    greedy = generate(model, prompt, max_tokens=8, temperature=0.0)[0]
    assert generate(model, prompt, max_tokens=8, temperature=1.0, top_k=1, seed=4)[0] == greedy
    assert generate(model, prompt, max_tokens=8, temperature=1.0, top_p=1e-6, seed=5)[0] == greedy


def test_filters_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.0] * 4 + [0.5, 0.3, 0.15, 0.05] + [1e-9] * 252]))
    keys = jax.random.split(jax.random.key(0), 2000)
    topk = np.asarray(
        jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0))[0])(keys)
    )
    assert set(topk.tolist()) == {4, 5, 6}
    # Nucleus 0.6: the smallest set with mass >= 0.6 is {0.5, 0.3}.
    topp = np.asarray(
        jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(1.0), jnp.int32(0), jnp.float32(0.6))[0])(keys)
    )
    assert set(topp.tolist()) == {4, 5}
    assert abs(np.mean(topp == 4) - 0.5 / 0.8) < 0.05


def test_stop_sequences_and_max_tokens(model):
    free = generate(model, b"abc", max_tokens=20, temperature=0.0)[0]
    assert len(free) == 20
    cut = generate(model, b"abc", max_tokens=20, temperature=0.0, stop=[free[5:7]])[0]
    assert cut == free[: free.find(free[5:7])]


def test_cli_on_a_trained_run(fixture_corpus, tmp_path, capsys):
    from genesis_jax import generate as gen_cli, train

    cfg = write_small_run_config(tmp_path / "run.toml", fixture_corpus, max_steps=4, val_interval=0)
    assert train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert (
        gen_cli.main(["--run", str(tmp_path / "run"), "--prompt", "And God", "--max-tokens", "5", "--temperature", "0"])
        == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith("And God") and "step 4" in out.err
    assert gen_cli.main(["--run", str(tmp_path / "run"), "--step", "3", "--prompt", "x"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert gen_cli.main(["--run", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
