"""The attention kernels against a float64 NumPy attention with gradients: the Pallas kernel
(interpret mode on CPU) and the blocked XLA attention of the `xla` backend."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genesis_jax import config as C
from genesis_jax.kernels.blocked_attention import blocked_attention
from genesis_jax.kernels.flash_attention import BlockSizes, flash_attention
from genesis_jax.kernels.reference import decode_attention, reference_attention
from genesis_jax.model.attention import Backend
from genesis_jax.model.llama import Llama


def np_attention_with_grads(q, k, v, do, causal, seg):
    """Float64 forward and backward, written out per (batch, head) from the definitions."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    o, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    scale = 1.0 / math.sqrt(d)
    for bi in range(b):
        allowed = np.ones((sq, skv), bool)
        if causal:
            allowed &= np.arange(sq)[:, None] + (skv - sq) >= np.arange(skv)[None, :]
        if seg is not None:
            allowed &= seg[bi][:, None] == seg[bi][None, :]
        for h in range(hq):
            kh = h // group
            s = q[bi, :, h] @ k[bi, :, kh].T * scale
            s = np.where(allowed, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            p = np.where(allowed, np.exp(s - m), 0.0)
            z = p.sum(axis=1, keepdims=True)
            p = p / np.where(z == 0, 1.0, z)
            o[bi, :, h] = p @ v[bi, :, kh]
            g = do[bi, :, h]
            dv[bi, :, kh] += p.T @ g
            dp = g @ v[bi, :, kh].T
            ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
            dq[bi, :, h] = ds @ k[bi, :, kh] * scale
            dk[bi, :, kh] += ds.T @ q[bi, :, h] * scale
    return o, (dq, dk, dv)


def rel_err(got, want):
    """Relative L2 error; where the true value is (near) zero, e.g. dq and dk of a one-key
    softmax, the denominator is floored at elements of magnitude 0.1. With unit-scale inputs a
    true zero there is the float32 difference of two dot products of size ~head_dim (dp and
    delta), about 1e-6 absolute; measured 1.4e-5 relative to a 0.01 floor on one CPU, 1.4e-6
    against this one, while a real error stays orders of magnitude above 1e-5."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-1 * want.size**0.5)


def run_case(b, sq, skv, hq, hkv, d, causal, segments, dtype, seed, attend, scale=1.0):
    """Relative errors of `attend`'s output and gradients against float64."""
    rng = np.random.default_rng(seed)
    q = (scale * rng.normal(size=(b, sq, hq, d))).astype(np.float32)
    k = (scale * rng.normal(size=(b, skv, hkv, d))).astype(np.float32)
    v = rng.normal(size=(b, skv, hkv, d)).astype(np.float32)
    do = rng.normal(size=(b, sq, hq, d)).astype(np.float32)
    seg = rng.integers(0, 3, size=(b, sq)).astype(np.int32) if segments else None
    qj, kj, vj, doj = (jnp.asarray(x, dtype) for x in (q, k, v, do))
    # The float64 reference sees the same (rounded) inputs as the kernel.
    q64, k64, v64, do64 = (np.asarray(x.astype(jnp.float32)) for x in (qj, kj, vj, doj))
    want_o, want_g = np_attention_with_grads(q64, k64, v64, do64, causal, seg)
    segj = None if seg is None else jnp.asarray(seg)

    def f(q_, k_, v_):
        return attend(q_, k_, v_, causal=causal, segment_ids=segj)

    out, vjp = jax.vjp(f, qj, kj, vj)
    grads = vjp(doj)
    assert out.dtype == dtype and out.shape == q.shape
    for g, x in zip(grads, (qj, kj, vj)):
        assert g.dtype == dtype and g.shape == x.shape
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
    return rel_err(out, want_o), [rel_err(g, w) for g, w in zip(grads, want_g)]


SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)
# Both kernels with 16-position blocks, so that the cases below cross several blocks. The
# blocked attention is jitted: run op by op, its many small ops cost seconds per case.
blocked_jit = jax.jit(blocked_attention, static_argnames=("causal", "sm_scale", "block_q"))
KERNELS = {
    "pallas": lambda q, k, v, **kw: flash_attention(q, k, v, block_sizes=SMALL, **kw),
    "blocked": lambda q, k, v, **kw: blocked_jit(q, k, v, block_q=16, **kw),
}

CASES = [
    # b, sq, skv, hq, hkv, d, causal, segments
    (1, 1, 1, 2, 1, 16, True, False),  # seq 1
    (2, 37, 37, 4, 4, 16, True, False),  # not a multiple of any block size
    (1, 50, 50, 4, 2, 32, False, True),  # GQA 2, segments, not causal
    (2, 45, 45, 4, 1, 16, True, True),  # GQA 4, causal segments
    (1, 40, 24, 2, 2, 16, True, False),  # seq_q > seq_kv: the first 16 queries see nothing
    (1, 33, 33, 2, 1, 24, False, False),  # head_dim padded to 32
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}_q{}_k{}_h{}/{}_d{}_{}{}".format(*c[:6], "causal" if c[6] else "full", "_seg" if c[7] else ""),
)
def test_float32_matches_float64_reference(case, kernel):
    out_err, grad_errs = run_case(*case, dtype=jnp.float32, seed=sum(case[:6]), attend=KERNELS[kernel])
    assert out_err <= 1e-5
    assert max(grad_errs) <= 1e-5, grad_errs


@pytest.mark.parametrize(
    "case",
    [(2, 70, 70, 4, 2, 64, True, True), (1, 48, 48, 2, 2, 128, False, False)],
    ids=["hd64_gqa_causal_seg", "hd128_full"],
)
@pytest.mark.parametrize("kernel", ["pallas", "blocked"])
def test_bfloat16_within_1e2(case, kernel):
    attend = blocked_jit if kernel == "blocked" else flash_attention  # default block sizes
    out_err, grad_errs = run_case(*case, dtype=jnp.bfloat16, seed=3, attend=attend)
    assert out_err <= 1e-2
    assert max(grad_errs) <= 1e-2, grad_errs


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_logits_do_not_overflow(kernel):
    # Logits of magnitude ~4e3: a naive exp overflows; online softmax must not. At this scale a
    # recomputed float32 logit may differ by one ulp (~5e-4 absolute) from the forward's, which
    # moves a recomputed probability by that much relatively: the backward pass is held to that
    # bound, or to three times the XLA reference's own error if larger.
    out_err, grad_errs = run_case(
        1, 32, 32, 2, 2, 16, True, False, dtype=jnp.float32, seed=5, scale=30.0, attend=KERNELS[kernel]
    )
    rng = np.random.default_rng(5)
    q = (30.0 * rng.normal(size=(1, 32, 2, 16))).astype(np.float32)
    k = (30.0 * rng.normal(size=(1, 32, 2, 16))).astype(np.float32)
    v = rng.normal(size=(1, 32, 2, 16)).astype(np.float32)
    do = rng.normal(size=(1, 32, 2, 16)).astype(np.float32)
    _, want = np_attention_with_grads(q, k, v, do, True, None)
    _, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, causal=True), q, k, v)
    ref_errs = [rel_err(g, w) for g, w in zip(vjp(jnp.asarray(do)), want)]
    max_logit2 = np.abs(np.einsum("bqhd,bkhd->bhqk", q, k)).max() / 4.0 * math.log2(math.e)
    recompute_bound = 2 * float(np.spacing(np.float32(max_logit2)))
    assert max_logit2 > 1000 and out_err <= 1e-5
    for ours, xla in zip(grad_errs, ref_errs):
        assert ours <= max(recompute_bound, 3 * xla), (grad_errs, ref_errs, recompute_bound)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_are_zero_not_nan(kernel):
    q = jnp.ones((1, 40, 2, 16))
    kv = jnp.ones((1, 24, 2, 16))
    out = KERNELS[kernel](q, kv, kv, causal=True)
    assert np.all(np.asarray(out[:, :16]) == 0.0) and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_inside_the_model(kernel):
    cfg = C.from_dict({"model": {"preset": "test", "n_kv_heads": 2, "compute_dtype": "float32"}})
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 260, size=(2, 21)), jnp.int32)

    def loss_and_grads(attn):
        model = Llama(cfg.model, nnx.Rngs(0), attn=Backend("under_test", attn, decode_attention, None, "test"))
        g, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(g, p)(tokens)
            return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, :] * jax.nn.one_hot(tokens[:, 1:], 260)) * 260

        return jax.jit(jax.value_and_grad(loss))(params)

    (l_ref, g_ref), (l_ker, g_ker) = loss_and_grads(reference_attention), loss_and_grads(KERNELS[kernel])
    assert float(l_ker) == pytest.approx(float(l_ref), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_ker), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(q=(2, 8, 4)), "q must be [batch, seq_q, heads_q, head_dim]"),
        (dict(k=(2, 8, 3, 16), v=(2, 8, 3, 16)), "heads_q = 4 must be a multiple of heads_kv = 3"),
        (dict(v=(2, 9, 2, 16)), "v must have k's shape"),
        (dict(k=(2, 8, 2, 8), v=(2, 8, 2, 8)), "k must be [batch, seq_kv, heads_kv, head_dim]"),
        (dict(dtype=jnp.int32), "q: dtype int32 not supported"),
        (dict(q=(2, 8, 4, 512), k=(2, 8, 2, 512), v=(2, 8, 2, 512)), "head_dim 512 > 256"),
        (dict(segment_ids=(2, 7)), "segment_ids must be [batch, seq]"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(args, message):
    shapes = {"q": (2, 8, 4, 16), "k": (2, 8, 2, 16), "v": (2, 8, 2, 16)}
    shapes.update({k: v for k, v in args.items() if k in shapes})
    dtype = args.get("dtype", jnp.float32)
    q, k, v = (jnp.zeros(shapes[n], dtype) for n in ("q", "k", "v"))
    seg = jnp.zeros(args["segment_ids"], jnp.int32) if "segment_ids" in args else None
    with pytest.raises(ValueError) as e:
        flash_attention(q, k, v, segment_ids=seg)
    assert message in str(e.value)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernels_lower_to_triton_for_cuda(dtype, cuda_lowering):
    """Without a GPU, lower for CUDA anyway: every kernel must pass Pallas's Triton lowering
    (compiling that IR to machine code happens on a GPU only)."""
    from jax import export

    def loss(q, k, v, seg):
        return flash_attention(q, k, v, causal=True, segment_ids=seg, interpret=False).astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((2, 200, 8, 64), dtype)
    kv = jax.ShapeDtypeStruct((2, 200, 4, 64), dtype)
    seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for fn, kernels in ((loss, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
        with cuda_lowering():
            exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(q, kv, kv, seg)
        assert exp.mlir_module().count("xla.gpu.triton") == kernels  # forward; forward + dq + dk/dv


def test_model_train_loss_lowers_with_the_kernel_for_cuda(cuda_lowering):
    """The scanned, rematerialised model with the kernel lowers for CUDA (bf16, GQA)."""
    import functools

    from jax import export

    cfg = C.from_dict({"model": {"preset": "test", "n_kv_heads": 2, "remat": True, "compute_dtype": "bfloat16"}})
    attn = functools.partial(flash_attention, interpret=False)
    graphdef, params = nnx.split(
        Llama(cfg.model, nnx.Rngs(0), attn=Backend("kernel", attn, decode_attention, None, "test"))
    )

    def loss(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    tokens = jax.ShapeDtypeStruct((4, 96), jnp.int32)
    with cuda_lowering():
        exp = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"], disabled_checks=[triton])(params, tokens)
    assert exp.mlir_module().count("xla.gpu.triton") >= 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_block_skipping_never_reads_a_future_block(kernel):
    """Values can not show block skipping (masked tiles contribute 0 either way), but NaNs can:
    0 * NaN is NaN, so a tile that is loaded and masked still poisons its result. With NaN in
    every key/value row from 32 on, queries 0-31 (query blocks 0 and 1 of 16) and their dq stay
    finite only if key blocks beyond their last visible key are never read; with NaN in every
    query and output-gradient row before 32, dk and dv of the key block 32-63 (backward block
    32) stay finite only if query blocks before it are never read."""
    rng = np.random.default_rng(0)
    b, s, h, d = 1, 64, 2, 16
    q, k, v, do = (jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32) for _ in range(4))
    fn = lambda q_, k_, v_: KERNELS[kernel](q_, k_, v_, causal=True)  # noqa: E731
    k_bad, v_bad = k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan)
    out, vjp = jax.vjp(fn, q, k_bad, v_bad)
    dq, _, _ = vjp(do)
    assert np.isfinite(np.asarray(out[:, :32])).all() and np.isfinite(np.asarray(dq[:, :32])).all()
    assert np.isnan(np.asarray(out[:, 32:])).all()  # the poison is real where it must be read
    q_bad, do_bad = q.at[:, :32].set(jnp.nan), do.at[:, :32].set(jnp.nan)
    _, vjp = jax.vjp(fn, q_bad, k, v)
    _, dk, dv = vjp(do_bad)
    assert np.isfinite(np.asarray(dk[:, 32:])).all() and np.isfinite(np.asarray(dv[:, 32:])).all()
    assert np.isnan(np.asarray(dv[:, :32])).all()


def test_blocked_backward_saves_no_score_matrix():
    """The memory-efficient backward: what the forward keeps for the backward is the inputs,
    the output and one float32 log-sum-exp per row, nothing of size seq_q x seq_kv."""
    from jax._src.ad_checkpoint import saved_residuals

    b, s, hq, hkv, d = 2, 96, 4, 2, 16
    q = jnp.ones((b, s, hq, d))
    kv = jnp.ones((b, s, hkv, d))
    saved = saved_residuals(lambda q_, k_, v_: blocked_attention(q_, k_, v_, block_q=32), q, kv, kv)
    sizes = sorted(int(np.prod(aval.shape)) for aval, _ in saved)
    assert max(sizes) == q.size and sum(sizes) <= 2 * q.size + 2 * kv.size + b * s * hq, saved


def test_blocked_default_blocks_on_a_long_gqa_sequence():
    """The default block size over many blocks with an uneven tail, GQA 3:1 and segments."""
    out_err, grad_errs = run_case(1, 200, 200, 6, 2, 32, True, True, dtype=jnp.float32, seed=7, attend=blocked_jit)
    assert out_err <= 1e-5 and max(grad_errs) <= 1e-5, grad_errs
