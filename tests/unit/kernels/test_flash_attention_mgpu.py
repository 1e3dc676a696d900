"""The Mosaic GPU kernels (forward, dq, dk/dv) in GPU interpret mode (CPU), race detection on,
against the float64 attention and gradients of test_flash_attention.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import np_attention_with_grads, rel_err

from genesis_jax.kernels.mosaic.forward import MosaicBlocks, flash_attention_mgpu

interpret_gpu = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call", reason="this JAX has no GPU interpret mode"
)
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: E402

ONE_WG = MosaicBlocks(compute_wgs=1, compute_wgs_bwd=1)
CASES = [
    # b, sq, skv, hq, hkv, d, causal, segments, dtype[, blocks]; the forward's default: two compute
    # warpgroups (128 query rows a block) alternating by a schedule barrier
    (1, 100, 100, 2, 1, 64, True, False, jnp.bfloat16),  # odd length, GQA 2:1, diagonal and padded tiles
    (1, 130, 130, 1, 1, 128, True, True, jnp.bfloat16),  # three key tiles through a two-slot ring, segments
    (1, 70, 50, 2, 1, 64, True, False, jnp.float16),  # seq_q > seq_kv: the first 20 rows see nothing
    (1, 45, 45, 4, 1, 32, False, True, jnp.float16),  # GQA 4:1, segments, head_dim 32 padded to 64
    (1, 150, 150, 2, 1, 64, True, True, jnp.bfloat16, ONE_WG),  # one compute warpgroup, 3 query tiles
    # key tiles of 128 through a 3-slot ring (settings of the benchmark's Mosaic sweep)
    (1, 200, 200, 2, 1, 64, True, True, jnp.bfloat16, MosaicBlocks(block_k=128, stages=3)),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}_q{}_k{}_h{}/{}_d{}_{}{}_{}{}".format(
        *c[:6],
        "causal" if c[6] else "full",
        "_seg" if c[7] else "",
        jnp.dtype(c[8]).name,
        ""
        if len(c) < 10
        else "_" + "_".join(f"{k}{v}" for k, v in vars(c[9]).items() if v != getattr(MosaicBlocks(), k)),
    ),
)
def test_forward_and_backward_match_float64_without_races(case):
    b, sq, skv, hq, hkv, d, causal, segments, dtype = case[:9]
    blocks = case[9] if len(case) > 9 else None
    rng = np.random.default_rng(sq + d)
    q, k, v, do = (rng.normal(size=(b, s, h, d)) for s, h in ((sq, hq), (skv, hkv), (skv, hkv), (sq, hq)))
    seg = rng.integers(0, 3, size=(b, sq)).astype(np.int32) if segments else None
    qj, kj, vj, doj = (jnp.asarray(x, dtype) for x in (q, k, v, do))
    want, want_grads = np_attention_with_grads(*(np.asarray(x, np.float32) for x in (qj, kj, vj, doj)), causal, seg)
    interpret_gpu.reset_gpu_interpret_mode_state()
    segj = None if seg is None else jnp.asarray(seg)
    out, vjp = jax.vjp(
        lambda a, b_, c: flash_attention_mgpu(
            a,
            b_,
            c,
            causal=causal,
            segment_ids=segj,
            block_sizes=blocks,
            interpret=InterpretGPUParams(detect_races=True),
        ),
        qj,
        kj,
        vj,
    )
    grads = vjp(doj)
    assert not interpret_gpu.get_races().races_found
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, want) <= 1e-2
    for g, w, x in zip(grads, want_grads, (qj, kj, vj)):
        assert g.dtype == dtype and g.shape == x.shape
        assert rel_err(g, w) <= 1e-2
    if sq > skv and causal:
        assert np.all(np.asarray(out[:, : sq - skv], np.float32) == 0.0)


def test_float32_and_bad_blocks_are_refused_with_the_reason():
    x = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="float32 runs in kernels.flash_attention"):
        flash_attention_mgpu(x, x, x)
    with pytest.raises(ValueError, match="block_q must be 64"):
        MosaicBlocks(block_q=128)
    with pytest.raises(ValueError, match="compute_wgs and compute_wgs_bwd must be 1 or 2"):
        MosaicBlocks(compute_wgs=3)
    with pytest.raises(ValueError, match="fit 65536 registers"):
        MosaicBlocks(registers=(240, 40))
