"""`python -m genesis_jax.train --config FILE [--run-dir DIR] [--set section.key=value ...]`.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import config as config_lib
from .checkpoint import SHAPE_KEYS, Checkpointer, check_shape
from .config import Config
from .data import ValWindows, open_configured, selected_locales, val_windows
from .errors import UserError
from .flops import peak_flops, train_flops_per_token
from .logs import Console, MetricsDB, TensorBoard, format_line
from .sampler import DeviceCorpus, MaskParams, build_device_corpus
from .step import TrainState, init_model, init_state, make_eval_step, make_mesh, make_train_step


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves at the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def model_shape(cfg: Config) -> dict[str, Any]:
    return {k: getattr(cfg.model, k) for k in SHAPE_KEYS}


class Validator:
    """Scores the fixed held-out windows: global and per-locale CE, perplexity, bits per byte."""

    def __init__(self, windows: Any, batch_size: int, graphdef: nnx.GraphDef, sharding: NamedSharding):
        self.w, self.batch = windows, batch_size
        self.fn = jax.jit(make_eval_step(graphdef))
        self.sharding = sharding

    def __call__(self, params: Any) -> dict[str, float]:
        n = len(self.w.locale)
        if n == 0:
            return {}
        losses = []
        for lo in range(0, n, self.batch):
            idx = np.arange(lo, lo + self.batch) % n  # pad the last batch by wrapping; extra rows dropped
            x = jax.device_put(self.w.inputs[idx], self.sharding)
            y = jax.device_put(self.w.labels[idx], self.sharding)
            losses.append(np.asarray(self.fn(params, x, y))[: min(self.batch, n - lo)])
        per = np.concatenate(losses)
        out = {"val/loss": float(per.mean())}
        for i, loc in enumerate(self.w.locales):
            sel = per[self.w.locale == i]
            if len(sel):
                out[f"val/loss/{loc}"] = float(sel.mean())
        for key in list(out):
            ce = out[key]
            out[key.replace("val/loss", "val/ppl")] = math.exp(min(ce, 50.0))
            out[key.replace("val/loss", "val/bpb")] = ce / math.log(2.0)
        return out


def _print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_changes(cfg: Config, run_dir: Path) -> list[str]:
    """On a resume, what differs from the run directory's stored config."""
    stored = run_dir / "config.toml"
    if not stored.is_file():
        return []
    try:
        old = config_lib.load(stored)
    except UserError as e:
        return [f"(stored config.toml unreadable: {e})"]
    return config_lib.diff(config_lib.to_dict(old), config_lib.to_dict(cfg))


def write_config(cfg: Config, run_dir: Path) -> None:
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(config_lib.to_toml(cfg), encoding="utf-8")
    tmp.replace(run_dir / "config.toml")


@dataclass
class Setup:
    """Everything the loop needs, built the same way for training and for benchmarks."""

    mesh: Mesh
    locales: list[str]
    corpus_path: Path
    device_corpus: DeviceCorpus
    windows: ValWindows
    graphdef: nnx.GraphDef
    state: TrainState
    replicated: NamedSharding


def build(cfg: Config) -> Setup:
    """Open the corpus, put its training split on the devices, initialise the state."""
    mesh = make_mesh()
    config_lib.check_devices(cfg, mesh.size)
    corpus = open_configured(cfg.data)
    locales = selected_locales(corpus, cfg.data)
    tokens, words, starts = corpus.stream(locales, heldout=False)
    replicated = NamedSharding(mesh, P())
    device_corpus = build_device_corpus(tokens, words, starts, cfg.data.seq_len, replicated)
    if int(device_corpus.valid_cum[-1]) == 0:
        raise UserError(f"data.seq_len = {cfg.data.seq_len}: longer than every locale's training text in {corpus.path}")
    vt, _, vs = corpus.stream(locales, heldout=True)
    windows = val_windows(vt, vs, locales, cfg.data.seq_len, cfg.training.val_windows)
    model = init_model(cfg)
    graphdef = nnx.graphdef(model)
    state = jax.device_put(init_state(cfg, model), replicated)
    return Setup(mesh, locales, corpus.path, device_corpus, windows, graphdef, state, replicated)


def compile_step(cfg: Config, s: Setup, mask: MaskParams) -> Any:
    """Ahead-of-time compiled train step with the state donated."""
    return jax.jit(make_train_step(cfg, s.graphdef, s.mesh), donate_argnums=0).lower(
        s.state, s.device_corpus, jax.random.key(cfg.training.seed), jnp.float32(1.0), mask).compile()


def train(cfg: Config, run_dir: Path) -> int:
    """Run or resume training in `run_dir`; returns the process exit code."""
    t_start = time.time()
    tc = cfg.training
    setup = build(cfg)
    mesh, locales, device_corpus, windows, graphdef = (setup.mesh, setup.locales, setup.device_corpus,
                                                        setup.windows, setup.graphdef)
    state = setup.state
    run_dir.mkdir(parents=True, exist_ok=True)
    diffs = config_changes(cfg, run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        meta = ckpt.read_meta(latest)
        check_shape(meta.get("model_shape", {}), model_shape(cfg), run_dir)
        state = ckpt.restore(latest, state)
        _print_err(f"resuming {run_dir} from step {latest}")
        for line in diffs:
            _print_err(f"  changed since the last launch: {line}")
    write_config(cfg, run_dir)  # only once the resume is known to be possible

    db = MetricsDB(run_dir / "metrics.sqlite")
    db.start(config_lib.config_hash(cfg), model_shape(cfg),
             {"lr": cfg.optim.lr, "batch_size": tc.batch_size, "grad_accum_steps": tc.grad_accum_steps,
              "seq_len": cfg.data.seq_len, "max_steps": tc.max_steps, "seed": tc.seed})
    tb = TensorBoard(run_dir / "tensorboard" if cfg.logging.tensorboard else None)
    console = Console(tc.max_steps, cfg.logging.progress)
    stop = StopRequested()
    stop.install()

    seed_key = jax.random.key(tc.seed)
    lr_mult = jnp.float32(1.0)
    mask = MaskParams.make(mask_id=cfg.data.mask_id)
    t_compile = time.time()
    step_fn = compile_step(cfg, setup, mask)
    compile_s = time.time() - t_compile
    validator = Validator(windows, tc.batch_size, graphdef, NamedSharding(mesh, P("data")))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops()
    console.print(f"run {run_dir} | {n_params:,} parameters | {len(locales)} locales | {int(device_corpus.valid_cum[-1]):,} "
                  f"train windows | {len(windows.locale)} val windows | {mesh.size} {jax.default_backend()} device(s) | "
                  f"step compiled in {compile_s:.1f}s")

    start = int(state.step)
    last_loss: float | None = None
    last_val: float | None = None
    pending: tuple[int, dict[str, jax.Array]] | None = None
    t_mark, s_mark = time.time(), start
    rate: float | None = None
    status, code = "completed", 0

    def meta_now(step: int) -> dict[str, Any]:
        return {"step": step, "model_shape": model_shape(cfg), "config": config_lib.to_dict(cfg),
                "seed": tc.seed, "sampler": {"kind": "fold_in(seed, step)", "next_step": step}}

    def flush(p: tuple[int, dict[str, jax.Array]]) -> None:
        nonlocal t_mark, s_mark, last_loss, rate
        s, dev = p
        m = {k: float(v) for k, v in jax.device_get(dev).items()}
        now = time.time()
        steps_done = s + 1 - s_mark
        # The first step after a (re)start carries dispatch warm-up: no rate from it alone.
        measured = steps_done > 0 and now > t_mark and s > start
        tps = steps_done * tokens_per_step / (now - t_mark) if measured else None
        rate = steps_done / (now - t_mark) if measured else rate
        t_mark, s_mark = now, s + 1
        eta = (tc.max_steps - s - 1) / rate if rate else None
        last_loss = m["loss"]
        row = {"step": s, "loss": m["loss"], "loss_ema": m["loss_ema"], "grad_norm": m["grad_norm"], "lr": m["lr"],
               "mask_prob": 0.0, "phase": 1, "tokens_per_sec": tps, "wall_time": now}
        db.log_train(row)
        tb.scalars(s, {"Train/Loss": m["loss"], "Train/LossEMA": m["loss_ema"], "Train/LR": m["lr"],
                       "Train/GradNorm": m["grad_norm"], "Train/MaskProb": 0.0, "Train/Phase": 1.0,
                       **({"System/TokensPerSec": tps} if tps else {}),
                       **({"System/MFU": tps * flops_per_token / (peak * mesh.size)} if tps and peak else {})})
        console.print(format_line({**row, "phase_name": "BYTE"}, tc.max_steps, eta))

    def validate(done: int) -> None:
        nonlocal last_val
        vals = validator(state.params)
        if not vals:
            return
        last_val = vals["val/loss"]
        db.log_eval(done, vals)
        db.log_languages(done, {loc: (None, vals[f"val/loss/{loc}"]) for loc in locales if f"val/loss/{loc}" in vals})
        tb.scalars(done, {"Eval/" + k.split("/", 1)[1].replace("/", "_"): v for k, v in vals.items()})
        console.print(f"val  {done:>7d}/{tc.max_steps} | loss {vals['val/loss']:.4f} | ppl {vals['val/ppl']:.2f} | "
                      f"bpb {vals['val/bpb']:.3f} | " + " ".join(f"{loc} {vals[f'val/loss/{loc}']:.3f}"
                                                              for loc in locales if f"val/loss/{loc}" in vals))

    if start == 0 and tc.val_interval:
        validate(0)
    done = start
    try:
        for s in range(start, tc.max_steps):
            state, metrics = step_fn(state, device_corpus, seed_key, lr_mult, mask)
            done = s + 1
            if pending is not None:
                flush(pending)
                pending = None
            if s % tc.log_interval == 0 or done == tc.max_steps:
                pending = (s, metrics)
            console.progress(done, (tc.max_steps - done) / rate if rate else None)
            if tc.val_interval and (done % tc.val_interval == 0 or done == tc.max_steps):
                if pending is not None:
                    flush(pending)
                    pending = None
                validate(done)
            if done % cfg.checkpoint.save_interval == 0 or done == tc.max_steps or stop.signum is not None:
                ckpt.save(done, state, meta_now(done))
            if stop.signum is not None:
                status, code = "interrupted", 128 + stop.signum
                break
        if pending is not None:
            flush(pending)
    except Exception as e:  # noqa: BLE001 - report in one line, keep what is valid
        status, code = "failed", 1
        saved = ""
        leaves = jax.tree.leaves(state)
        if done > start and not any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            try:
                ckpt.save(int(state.step), state, meta_now(int(state.step)))
                saved = f"; saved step {int(state.step)}"
            except Exception:  # noqa: BLE001
                saved = ""
        ckpt.wait()
        _print_err(f"error: training failed after step {done}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                   f"{saved}; latest checkpoint: {ckpt.latest_step()}")
    finally:
        ckpt.close()
        console.close()
        db.finish(status, done, last_loss, last_val)
        db.close()
        tb.close()
    if status == "interrupted":
        _print_err(f"interrupted by signal {stop.signum} after step {done}; checkpoint saved; run the same command to resume")
    elif status == "completed":
        console.print(f"done: {done} steps in {time.time() - t_start:.0f}s; run directory {run_dir}")
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m genesis_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="TOML run config (see configs/)")
    ap.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key, typed by the schema (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.set)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
        return train(cfg, run_dir)
    except UserError as e:
        _print_err(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _print_err("interrupted before training started")
        return 130


if __name__ == "__main__":
    sys.exit(main())
