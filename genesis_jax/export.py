"""`python -m genesis_jax.export --run DIR --out DIR`: a checkpoint as a Hugging Face model
directory (safetensors, config.json, generation_config.json, the byte tokenizer, a model card)
that transformers' AutoModelForCausalLM and AutoTokenizer load offline."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from flax import nnx

from .config.ranges import COUNT0, flag
from .core.cli import ArgumentParser, run_cli
from .core.errors import UserError
from .hf import files as hf_files
from .hf.export import Source, check_out, write_export
from .training.rundir import load_run

DTYPES = ("float32", "bfloat16")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m genesis_jax.export", description=__doc__)
    ap.add_argument("--run", type=Path, required=True, help="run directory")
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--step", type=flag(COUNT0), help="checkpoint step (default: the latest)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype in the files")
    ap.add_argument("--max-shard-size", default="5GB", help="larger weights are split into shards with an index")
    ap.add_argument(
        "--force", action="store_true", help="write into an --out that holds other files (they are left as they are)"
    )
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.export", lambda: export(args))


def export(args: argparse.Namespace) -> int:
    max_shard = parse_size(args.max_shard_size)
    args.out = Path(os.path.abspath(args.out))  # "." has no name: the temporary beside it would land inside it
    previous = check_out(args.out, args.force)
    run = load_run(args.run, args.step)
    hf_files.need("safetensors")  # both before anything is written
    hf_files.need("tokenizers")
    params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
    source = Source(run.cfg, params, run.step, str(run.meta.get("corpus_sha256", "unknown")), args.run)
    written = write_export(source, args.out, args.dtype, max_shard, previous)
    print(f"exported {args.run} step {run.step} ({args.dtype}) to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
