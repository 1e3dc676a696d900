"""`python -m genesis_jax.export --run DIR --out DIR`: a checkpoint as a Hugging Face model
directory (safetensors, config.json, generation_config.json, the byte tokenizer, a model card)
that transformers' AutoModelForCausalLM and AutoTokenizer load offline."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from flax import nnx

from . import config as config_lib
from .config.ranges import COUNT0, flag
from .core.cli import ArgumentParser, run_cli
from .core.errors import UserError
from .core.writing import write_file
from .hf import files as hf_files
from .hf.layout import to_hf
from .training.rundir import LoadedRun, load_run

MANIFEST = "genesis_export.json"  # what an export wrote: the files a later --force may replace
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
    written = write_export(run, args.run, args.out, args.dtype, max_shard, previous)
    print(f"exported {args.run} step {run.step} ({args.dtype}) to {args.out}: {', '.join(written)}")
    return 0


def check_out(out: Path, force: bool) -> list[str]:
    """The files a previous export wrote into `out` (replaced now); anything else there needs --force."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not out.exists():
        return []
    previous: list[str] = []
    if (out / MANIFEST).is_file():
        try:
            listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, OSError):
            listed = []
        # plain names inside `out` only: a manifest never reaches another directory
        previous = [
            x
            for x in (listed if isinstance(listed, list) else [])
            if isinstance(x, str) and Path(x).name == x and x not in ("", ".", "..")
        ]
    others = sorted(p.name for p in out.iterdir() if p.name not in {*previous, MANIFEST})
    if others and not force:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(
            f"--out {out}: holds files this export did not write ({shown}); choose an empty directory, "
            "or pass --force to write beside them"
        )
    return previous


def write_export(
    run: LoadedRun, run_dir: Path, out: Path, dtype: str, max_shard: int, previous: list[str]
) -> list[str]:
    """Write every file into a fresh directory beside `out`, then move them in: a failure leaves
    `out` as it was."""
    params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
    tensors = to_hf(params, run.cfg.model)
    if dtype != "float32":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        names = hf_files.write_weights(tensors, tmp, max_shard)
        names += hf_files.write_tokenizer(tmp, run.cfg.data.seq_len)
        write_json(tmp / "config.json", hf_files.hf_config(run.cfg.model, run.cfg.data.seq_len, dtype))
        write_json(tmp / "generation_config.json", hf_files.generation_config())
        if run.cfg.model.norm_type == "deepnorm":
            shutil.copyfile(Path(__file__).parent / "hf" / "remote" / hf_files.REMOTE_CODE, tmp / hf_files.REMOTE_CODE)
            names.append(hf_files.REMOTE_CODE)
        (tmp / "README.md").write_text(model_card(run, run_dir, dtype), encoding="utf-8")
        names += ["config.json", "generation_config.json", "README.md"]
        write_json(tmp / MANIFEST, {"files": names, "run": str(run_dir), "step": run.step})
        if not out.exists():
            tmp.rename(out)
            return names
        theirs = sorted(n for n in names if (out / n).exists() and n not in previous)
        if theirs:
            raise UserError(
                f"--out {out}: {', '.join(theirs[:3])} would replace files this export did not write; "
                "move them, or choose another directory"
            )
        for name in [*names, MANIFEST]:
            os.replace(tmp / name, out / name)
        for stale in set(previous) - set(names):
            (out / stale).unlink(missing_ok=True)  # an earlier export's, no longer part of this one
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_file(path, json.dumps(data, indent=2) + "\n")


def validation_loss(run_dir: Path, step: int) -> tuple[int, float] | None:
    """The last held-out loss logged at or before `step`."""
    db = run_dir / "metrics.sqlite"
    if not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT step, value FROM evaluation_logs WHERE name = 'val/loss' AND step <= ? "
                "ORDER BY step DESC LIMIT 1",
                (step,),
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return (int(row[0]), float(row[1])) if row else None


def model_card(run: LoadedRun, run_dir: Path, dtype: str) -> str:
    cfg, m = run.cfg, run.cfg.model
    val = validation_loss(run_dir, run.step)
    val_line = f"{val[1]:.4f} (held-out cross-entropy per byte, nats, at step {val[0]})" if val else "none logged"
    deep = m.norm_type == "deepnorm"
    remote = ", trust_remote_code=True" if deep else ""
    arch = (
        "a post-norm DeepNet decoder (its modeling file travels in this directory)"
        if deep
        else "a Llama (LlamaForCausalLM)"
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [genesis-jax, byte-level]",
        "---",
        "",
        f"# {run_dir.name}, step {run.step}",
        "",
        f"A byte-level decoder trained with genesis-jax, exported as {arch}: {m.dim} wide, {m.n_layers} layers, "
        f"{m.n_heads} query / {m.n_kv_heads} key-value heads, {m.norm_type}, weights in {dtype}.",
        "",
        f"- Step: {run.step}",
        f"- Validation loss: {val_line}",
        f"- Corpus: {cfg.data.corpus} (content sha256 {run.meta.get('corpus_sha256', 'unknown')}), "
        f"locales {', '.join(cfg.data.locales) or 'all'}",
        "- Tokens: ids 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, byte b -> b + 4; no BOS or EOS was added in training.",
    ]
    if cfg.mtl.enabled:
        lines.append(
            "- Multi-task heads (coherence, cross-reference, paraphrase) were trained beside the language "
            "model; they are not part of a causal LM and are not exported."
        )
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(path{remote})",
        f"tokenizer = AutoTokenizer.from_pretrained(path{remote})",
        "```",
        "",
        "## The run's config",
        "",
        "```toml",
        config_lib.to_toml(cfg).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
