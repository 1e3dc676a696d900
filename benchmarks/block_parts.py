"""Each part of a decoder block, forward + backward, ours against PyTorch, side by side in one
process: where the CPU train step's gap to PyTorch lives (benchmarks/README.md).

  python benchmarks/block_parts.py --dims 192,16,6,768 --seq 256 --batch 8 [--rounds 5] [--iters 10]

Parts, at one layer's shapes (float32): `qkv+rope` (the three projections and the rotary
embedding), `attention` (our `xla` backend, kernels/blocked_attention.py, against PyTorch's
scaled_dot_product_attention, causal), `wo`, `swiglu` (w1, w3, silu gate, w2), `norms`
(DeepNet's two residual LayerNorms), and once per step `embed+head+loss` (the tied embedding,
the final RMSNorm, the logits and cross-entropy) and `optimizer` (clip and AdamW over a
model's parameters). Ours are jitted functions of the engine's own modules, gradients with
respect to the parameters and the input; PyTorch's the same computation with autograd. Each
round times `--iters` calls per side, interleaved; medians of the rounds. The last columns
multiply the per-layer parts by the depth: an estimate of each part's share of a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from genesis_jax import config as C  # noqa: E402
from genesis_jax.config.ranges import COUNT, flag  # noqa: E402
from genesis_jax.core.cli import ArgumentParser, run_cli  # noqa: E402
from genesis_jax.core.tokenizer import VOCAB_SIZE  # noqa: E402
from genesis_jax.model import attention as attention_lib  # noqa: E402
from genesis_jax.model.llama import Attention, Llama, SwiGLU, deepnorm_alpha  # noqa: E402
from genesis_jax.model.norms import LayerNorm  # noqa: E402


def jax_parts(dims: list[int], seq: int, batch: int) -> dict[str, Callable[[], Any]]:
    with nnx.use_eager_sharding(False):  # modules outside a mesh, as Llama builds its blocks
        return _jax_parts(dims, seq, batch)


def _jax_parts(dims: list[int], seq: int, batch: int) -> dict[str, Callable[[], Any]]:
    dim, layers, heads, ffn = dims
    cfg = C.from_dict(
        {
            "model": {
                "preset": "tiny",
                "dim": dim,
                "n_layers": layers,
                "n_heads": heads,
                "n_kv_heads": heads,
                "intermediate_size": ffn,
                "norm_type": "deepnorm",
                "attention": "xla",
                "compute_dtype": "float32",
            }
        }
    )
    m, rngs = cfg.model, nnx.Rngs(0)
    backend = attention_lib.backend("xla")
    x = jax.random.normal(jax.random.key(1), (batch, seq, dim), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    alpha = deepnorm_alpha(layers)

    def grad_of(
        module: nnx.Module, fn: Callable[[nnx.Module, jax.Array], Any], *inputs: jax.Array
    ) -> Callable[[], Any]:
        graphdef, params = nnx.split(module)

        def loss(p: nnx.State, *xs: jax.Array) -> jax.Array:
            out = fn(nnx.merge(graphdef, p), *xs)
            return sum(jnp.sum(o * 1e-3) for o in (out if isinstance(out, tuple) else (out,)))

        g = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs) + 1))))
        return lambda: jax.block_until_ready(g(params, *inputs))

    att = Attention(m, backend, jnp.float32, rngs)
    q, k, v = jax.jit(lambda: att.qkv(x, positions))()
    model = Llama(m, rngs)
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 4, VOCAB_SIZE)
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, 0.9, 0.95, 1e-8, 0.1))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def optimizer(params: nnx.State, opt_state: Any) -> Any:
        updates, new = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new

    def head(model: Llama, h: jax.Array) -> jax.Array:
        logits = (model.final_norm(h) @ model.embed[...].T).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def embed(model: Llama, h: jax.Array) -> jax.Array:
        return head(model, h + jnp.take(model.embed[...], tokens[:, :-1], axis=0))

    attend = jax.jit(jax.grad(lambda q, k, v: jnp.sum(backend.fn(q, k, v, causal=True) * 1e-3), argnums=(0, 1, 2)))
    return {
        "qkv+rope": grad_of(att, lambda a, x: a.qkv(x, positions), x),
        "attention": lambda: jax.block_until_ready(attend(q, k, v)),
        "wo": grad_of(att, lambda a, o: a.wo(o.reshape(batch * seq, dim)), x),
        "swiglu": grad_of(SwiGLU(m, jnp.float32, rngs), lambda s, x: s(x), x),
        "norms": grad_of(_Pair(LayerNorm(dim), LayerNorm(dim)), lambda n, x: n.b(alpha * n.a(alpha * x + x) + x), x),
        "embed+head+loss": grad_of(model, embed, x),
        "optimizer": lambda: jax.block_until_ready(optimizer(params, opt_state)),
    }


class _Pair(nnx.Module):
    def __init__(self, a: nnx.Module, b: nnx.Module):
        self.a, self.b = a, b


def torch_parts(dims: list[int], seq: int, batch: int) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_step import torch_model

    dim, layers, heads, ffn = dims
    hd = dim // heads
    torch.manual_seed(0)
    model = torch_model(dim, layers, heads, ffn, seq)
    block = model.blocks[0]
    x = torch.randn(batch, seq, dim, requires_grad=True)
    tokens = torch.randint(4, VOCAB_SIZE, (batch, seq + 1))
    inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(t: torch.Tensor) -> torch.Tensor:
        te, to = t[..., 0::2], t[..., 1::2]
        return torch.stack([te * cos - to * sin, te * sin + to * cos], dim=-1).flatten(-2)

    q, k, v = (torch.randn(batch, heads, seq, hd, requires_grad=True) for _ in range(3))
    o = torch.randn(batch, seq, dim, requires_grad=True)

    def backward(*outs: torch.Tensor) -> None:
        sum((t * 1e-3).sum() for t in outs).backward()

    def qkv() -> None:
        b, n = batch, seq
        backward(
            rope(block.wq(x).view(b, n, heads, hd)),
            rope(block.wk(x).view(b, n, heads, hd)),
            block.wv(x).view(b, n, heads, hd),
        )

    def norms() -> None:
        h = block.norm1(block.alpha * x + x)
        backward(block.norm2(block.alpha * h + x))

    def embed_head_loss() -> None:
        h = x + model.embed(tokens[:, :-1])
        logits = (model.final_norm(h) @ model.embed.weight.t()).float()
        backward(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1)))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)

    def optimizer() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return {
        "qkv+rope": qkv,
        "attention": lambda: backward(F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "wo": lambda: backward(block.wo(o)),
        "swiglu": lambda: backward(block.w2(F.silu(block.w1(x)) * block.w3(x))),
        "norms": norms,
        "embed+head+loss": embed_head_loss,
        "optimizer": optimizer,
    }


def time_calls(fn: Callable[[], Any], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="192,16,6,768", help="dim,layers,heads,ffn")
    ap.add_argument("--seq", type=flag(COUNT), default=256)
    ap.add_argument("--batch", type=flag(COUNT), default=8)
    ap.add_argument("--rounds", type=flag(COUNT), default=5)
    ap.add_argument("--iters", type=flag(COUNT), default=10)
    ap.add_argument("--threads", type=flag(COUNT), default=2, help="PyTorch's intra-op threads")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("error: benchmarks/block_parts.py compares with PyTorch: pip install torch", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",")]
    if len(dims) != 4:
        print(f"error: --dims {args.dims}: expected dim,layers,heads,ffn", file=sys.stderr)
        return 2
    ours, theirs = jax_parts(dims, args.seq, args.batch), torch_parts(dims, args.seq, args.batch)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in ours}
    for name in ours:  # warm-up: compiles
        ours[name]()
        theirs[name]()
    for _ in range(args.rounds):
        for name in ours:
            times[name][0].append(time_calls(ours[name], args.iters))
            times[name][1].append(time_calls(theirs[name], args.iters))
    per_step = {"embed+head+loss": 1, "optimizer": 1}
    layers = dims[1]
    print(f"# {args.dims} seq {args.seq} batch {args.batch} float32, jax {jax.__version__}, torch {torch.__version__}")
    print(
        f"{'part':<16} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10} {'x':>3} {'ours/step':>10} {'torch/step':>10}"
    )
    total = [0.0, 0.0]
    for name, (a, b) in times.items():
        ja, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        n = per_step.get(name, layers)
        total[0] += n * ja
        total[1] += n * tb
        print(f"{name:<16} {ja:>9.2f} {tb:>9.2f} {ja / tb:>10.2f} {n:>3} {n * ja:>10.1f} {n * tb:>10.1f}")
    print(
        f"{'sum of parts':<16} {'':>9} {'':>9} {total[0] / total[1]:>10.2f} {'':>3} {total[0]:>10.1f} {total[1]:>10.1f}"
    )
    return 0 if np.isfinite(total).all() else 1


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/block_parts.py", main, devices=True))
