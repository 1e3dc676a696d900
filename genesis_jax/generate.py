"""`python -m genesis_jax.generate --run DIR [--step N] --prompt TEXT`: sample text from a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config.ranges import COUNT, COUNT0, FACTOR, NONNEGATIVE, SEED, Range, flag
from .core.cli import ArgumentParser, run_cli
from .core.errors import print_err
from .model.decoding import generate
from .training.rundir import load_run

MAX_TOKENS = 65536  # the KV cache grows with it; beyond this a single sample is no longer a quick look


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m genesis_jax.generate", description=__doc__)
    ap.add_argument("--run", type=Path, required=True, help="run directory")
    ap.add_argument("--step", type=flag(COUNT0), help="checkpoint step (default: the latest)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument(
        "--max-tokens", type=flag(Range(1, MAX_TOKENS, integer=True)), default=200, help="bytes to generate at most"
    )
    ap.add_argument("--temperature", type=flag(NONNEGATIVE), default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=flag(COUNT0), default=0, help="keep the k most likely bytes (0 = all)")
    ap.add_argument("--top-p", type=flag(FACTOR), default=1.0, help="nucleus: smallest set with this much mass")
    ap.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable); it is cut off")
    ap.add_argument("--num-samples", type=flag(COUNT), default=1)
    ap.add_argument("--seed", type=flag(SEED), default=0)
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.generate", lambda: sample(args), lambda: args.run / "logs")


def sample(args: argparse.Namespace) -> int:
    prompt = os.fsencode(args.prompt)  # bytes as given, even when they are not valid UTF-8
    run = load_run(args.run, args.step)
    outs = generate(
        run.model,
        prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=[os.fsencode(x) for x in args.stop],
        seed=args.seed,
        num_samples=args.num_samples,
    )
    print_err(f"# {args.run} step {run.step}")
    for i, out in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print((prompt + out).decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
