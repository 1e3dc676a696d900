"""Train-step throughput against an equivalent PyTorch model, measured side by side in one run.

  python benchmarks/torch_step.py --dims 192,16,6,768 --seq 256 --batch 8 [--dtype float32|bfloat16]
      [--rounds 5] [--steps 5] [--pause 0.5] [--threads N] [--torch-huge-pages]

dims = dim, layers, heads, SwiGLU width. Both sides run the same decoder: tied 260-byte
embedding, post-norm DeepNet blocks (LayerNorm, residual x alpha), interleaved RoPE, causal
attention, SwiGLU, a final RMSNorm, float32 logits and cross-entropy; AdamW (0.9, 0.95, eps
1e-8, weight decay 0.1) after a global-norm clip at 1.0, one update per step. JAX: the engine's
own compiled train step (runtime.build + compile_step, `xla` attention, batches drawn on the
device from a synthetic corpus), in this process, launched as `python -m genesis_jax.train`
launches (relaunched with glibc's huge pages unless `--set training.host_huge_pages=false`;
genesis_jax/core/host_memory.py). PyTorch: the model below (its optimizer's foreach path,
`scaled_dot_product_attention`, bf16 by autocast) in a process of its own with glibc's
defaults (`--torch-huge-pages` gives it the same tunable). Timing is interleaved: each round
times `--steps` JAX steps then `--steps` PyTorch steps, each after `--pause` idle seconds; the
median round per side is reported. The last line is `ratio <jax tokens/s / torch tokens/s>`.
PyTorch is an optional dependency.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks.synthetic import synthetic_corpus  # noqa: E402
from genesis_jax import config as C
from genesis_jax.config.ranges import COUNT, NONNEGATIVE, flag
from genesis_jax.core.cli import ArgumentParser, run_cli
from genesis_jax.core.errors import UserError
from genesis_jax.core.host_memory import TUNABLE, huge_pages_state, relaunch_with_huge_pages, with_huge_pages
from genesis_jax.core.tokenizer import VOCAB_SIZE
from genesis_jax.data.masks import MaskParams
from genesis_jax.model.llama import deepnorm_alpha
from genesis_jax.training.build import build, compile_step
from genesis_jax.training.step import StepControls


def torch_model(dim: int, layers: int, heads: int, ffn: int, seq: int) -> Any:  # a torch.nn.Module (torch is optional)
    import torch
    import torch.nn.functional as F
    from torch import nn

    head_dim = dim // heads
    inv = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv  # [L, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:  # [B, L, H, D], pairs (2i, 2i+1)
        xe, xo = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1).flatten(-2).to(x.dtype)

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale).to(x.dtype)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
            self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
            self.w2 = nn.Linear(ffn, dim, bias=False)
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.alpha = deepnorm_alpha(layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q = rope(self.wq(x).view(b, n, heads, head_dim)).transpose(1, 2)
            k = rope(self.wk(x).view(b, n, heads, head_dim)).transpose(1, 2)
            v = self.wv(x).view(b, n, heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, dim)
            x = self.norm1(self.alpha * x + self.wo(o))
            return self.norm2(self.alpha * x + self.w2(F.silu(self.w1(x)) * self.w3(x)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB_SIZE, dim)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.final_norm = RMSNorm()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return (self.final_norm(x) @ self.embed.weight.to(x.dtype).t()).float()

    return Model()


def torch_step_fn(args: argparse.Namespace, dims: list[int]) -> Callable[[int], None]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch_model(*dims, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, VOCAB_SIZE, (args.batch, args.seq + 1), generator=gen) for _ in range(4)]
    bf16 = args.dtype == "bfloat16"

    def step(i: int) -> None:
        tokens = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def jax_step_fn(args: argparse.Namespace, dims: list[int]) -> Callable[[int], None]:
    return jax_step(args, dims)[0]


def jax_config(args: argparse.Namespace, dims: list[int]) -> C.Config:
    """The engine's config for this comparison (args: seq, batch, dtype, --set)."""
    dim, layers, heads, ffn = dims
    corpus = synthetic_corpus(Path(tempfile.gettempdir()) / "genesis_jax_bench_corpus")
    cfg = C.load(
        ROOT / "configs" / "tiny.toml",
        [
            f"data.corpus={corpus}",
            f"data.seq_len={args.seq}",
            f"training.batch_size={args.batch}",
            f"model.dim={dim}",
            f"model.n_layers={layers}",
            f"model.n_heads={heads}",
            f"model.n_kv_heads={heads}",
            f"model.intermediate_size={ffn}",
            "model.norm_type=deepnorm",
            "model.attention=xla",
            f"model.compute_dtype={args.dtype}",
            "optim.grad_clip=1.0",
            "optim.lr=1e-3",
            "training.max_steps=100000",
            *(args.set or []),
        ],
    )
    return cfg


def jax_step(args: argparse.Namespace, dims: list[int]) -> tuple[Callable[[int], None], Any]:
    """One train step of the engine at these dims (args: seq, batch, dtype), and its compiled program."""
    cfg = jax_config(args, dims)
    setup = build(cfg)
    controls = StepControls.make(mask=MaskParams.make(mask_id=cfg.data.mask_id))
    t0 = time.perf_counter()
    compiled = compile_step(cfg, setup, controls)
    print(f"# jax step compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    key = jax.random.key(0)
    state = [setup.state]

    def step(i: int) -> None:
        state[0], metrics = compiled(state[0], setup.device_corpus, key, controls)
        jax.block_until_ready(metrics)

    return step, compiled


def timed(step: Callable[[int], None], steps: int, start: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        step(start + i)
    return (time.perf_counter() - t0) / steps


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The model and batch of the step this script and profile_step.py build (`jax_step`)."""
    ap.add_argument("--dims", default="192,16,6,768", help="dim,layers,heads,ffn")
    ap.add_argument("--seq", type=flag(COUNT), default=256)
    ap.add_argument("--batch", type=flag(COUNT), default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override our step's config (repeatable)")


def parse_dims(text: str) -> list[int] | None:
    """dim, layers, heads, ffn from --dims, or None (with the error printed) when malformed."""
    try:
        dims = [int(x) for x in text.split(",")]
    except ValueError:
        dims = []
    if len(dims) != 4 or dims[0] % dims[2]:
        print(f"error: --dims {text}: expected dim,layers,heads,ffn with heads dividing dim", file=sys.stderr)
        return None
    return dims


def torch_worker(args: argparse.Namespace, dims: list[int]) -> int:
    """The PyTorch side in its own process: warms up, says `ready`, then times `run N START`."""
    import torch

    torch.set_num_threads(args.threads)
    step = torch_step_fn(args, dims)
    timed(step, 2, 0)  # allocator, first-touch
    print(f"ready {torch.__version__} {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        n, start = (int(x) for x in line.split()[1:3])
        print(timed(step, n, start), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--rounds", type=flag(COUNT), default=5)
    ap.add_argument("--steps", type=flag(COUNT), default=5, help="steps per side per round")
    ap.add_argument(
        "--pause",
        type=flag(NONNEGATIVE),
        default=0.5,
        help="seconds idle before each side's round: without it, on 2 cores, the threads one side leaves "
        "spinning slow the other (PyTorch 7,918 tokens/s alone, 1,979 interleaved at 128/4/4/512)",
    )
    ap.add_argument(
        "--threads", type=flag(COUNT), default=len(os.sched_getaffinity(0)), help="PyTorch intra-op threads"
    )
    ap.add_argument(
        "--torch-huge-pages",
        action="store_true",
        help=f"run PyTorch with {TUNABLE}=1 too (default: glibc's defaults, as it launches)",
    )
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print("error: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return 2
    dims = parse_dims(args.dims)
    if dims is None:
        return 2
    if args.torch_worker:
        return torch_worker(args, dims)
    if argv is None and jax_config(args, dims).training.host_huge_pages:
        relaunch_with_huge_pages()  # as `python -m genesis_jax.train` does (never for a caller's argv)
    worker = subprocess.Popen(
        [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--torch-worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=with_huge_pages(os.environ, args.torch_huge_pages),
    )
    try:
        return compare(args, dims, worker)
    finally:
        worker.kill()
        worker.wait()


def compare(args: argparse.Namespace, dims: list[int], worker: subprocess.Popen[str]) -> int:
    def ask(line: str) -> str:
        assert worker.stdin is not None and worker.stdout is not None
        if line:
            worker.stdin.write(line + "\n")
            worker.stdin.flush()
        answer = worker.stdout.readline()
        if not answer:
            raise UserError(f"the PyTorch process ended (exit code {worker.wait()}); its error is above")
        return answer.strip()

    jax_side = jax_step_fn(args, dims)
    timed(jax_side, 2, 0)  # compilation, allocator, first-touch
    _, torch_version, threads = ask("").split()
    print(
        f"# dims {args.dims}, seq {args.seq}, batch {args.batch}, {args.dtype}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} (host huge pages {huge_pages_state()}), torch {torch_version} with "
        f"{threads} threads in its own process (host huge pages "
        f"{huge_pages_state(with_huge_pages(os.environ, args.torch_huge_pages))})",
        flush=True,
    )
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for r in range(args.rounds):
        time.sleep(args.pause)  # the other side's worker threads stop spin-waiting for work
        times["jax"].append(timed(jax_side, args.steps, 2 + r * args.steps))
        time.sleep(args.pause)
        times["torch"].append(float(ask(f"run {args.steps} {2 + r * args.steps}")))
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:<6} step {1000 * statistics.median(t):9.1f} ms (rounds: "
            f"{', '.join(f'{1000 * x:.1f}' for x in t)})  {rate[name]:10,.0f} tokens/s"
        )
    ratio = rate["jax"] / rate["torch"]
    print(f"ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/torch_step.py", main, devices=True))  # mistakes and faults in one line
