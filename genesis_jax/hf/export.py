"""A run's decoder as a Hugging Face model directory: safetensors, config.json,
generation_config.json, the byte tokenizer and a model card, written beside the target and moved
in, never over a file an export did not write (`python -m genesis_jax.export`)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as config_lib
from ..config.schema import Config
from ..core.errors import UserError
from ..core.writing import write_file
from . import files
from .layout import to_hf

MANIFEST = "genesis_export.json"  # what an export wrote: the files a later --force may replace


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


@dataclass(frozen=True)
class Source:
    """What an export is made of: a run's config, its decoder's parameters at a step (a plain
    tree), the corpus they were trained on, and the run directory (for the model card)."""

    cfg: Config
    params: dict[str, Any]
    step: int
    corpus_sha256: str
    run_dir: Path


def write_export(run: Source, out: Path, dtype: str, max_shard: int, previous: list[str]) -> list[str]:
    """Write every file into a fresh directory beside `out`, then move them in: a failure leaves
    `out` as it was."""
    tensors = to_hf(run.params, run.cfg.model)
    if dtype != "float32":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        names = files.write_weights(tensors, tmp, max_shard)
        names += files.write_tokenizer(tmp, run.cfg.data.seq_len)
        write_json(tmp / "config.json", files.hf_config(run.cfg.model, run.cfg.data.seq_len, dtype))
        write_json(tmp / "generation_config.json", files.generation_config())
        if run.cfg.model.norm_type == "deepnorm":
            shutil.copyfile(Path(__file__).parent / "remote" / files.REMOTE_CODE, tmp / files.REMOTE_CODE)
            names.append(files.REMOTE_CODE)
        (tmp / "README.md").write_text(model_card(run, dtype), encoding="utf-8")
        names += ["config.json", "generation_config.json", "README.md"]
        write_json(tmp / MANIFEST, {"files": names, "run": str(run.run_dir), "step": run.step})
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


def model_card(run: Source, dtype: str) -> str:
    cfg, m, run_dir = run.cfg, run.cfg.model, run.run_dir
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
        f"- Corpus: {cfg.data.corpus} (content sha256 {run.corpus_sha256}), "
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
