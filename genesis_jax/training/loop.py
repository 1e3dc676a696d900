"""The training loop: dispatch, the one-step-late metric queue, the stop agreement, and the
non-finite policies. What happens on a cadence of its own (validation, the quick evaluation,
checkpoint saves) is a hook (hooks.py).

What the run knows lives in `ResearchState` (research/state.py); where its numbers go, in the
sinks (telemetry/). The loop turns fetched metrics into one namespaced dict per event and hands it on.
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from .. import config as config_lib
from ..config.schema import Config
from ..core.cli import EXIT_ENVIRONMENT, first_line, out_of_memory, write_traceback
from ..core.errors import print_err
from ..data.masks import MaskParams
from ..evaluation.suite import EvalSuite, Validator
from ..model.flops import peak_flops, train_flops_per_token
from ..parallel.processes import any_process, is_primary
from ..parallel.sharding import batch_sharding, put, replicated
from ..research.curriculum import Controls, Signal
from ..research.state import ResearchState
from ..telemetry.console import Console
from ..telemetry.sink import Metrics, RunEnd, Sink
from ..telemetry.sinks import open_sinks
from ..telemetry.sqlite import MetricsDB
from .build import Setup
from .checkpoint import Checkpointer, model_shape
from .hooks import Hook, StepEnd, Validation, default_hooks
from .state import TrainState
from .step import StepControls, StepFn

EXIT_DIVERGED = 4


class Diverged(Exception):
    """Training cannot go on: non-finite values under the `stop` policy, or past the limit."""


class Rollback(Exception):
    """A non-finite update under the `rollback` policy: restart from the newest checkpoint."""


class StopFlag(Protocol):
    """Set by a SIGINT/SIGTERM (train.StopRequested): save at the current step and stop."""

    signum: int | None


def step_controls(ctl: Controls, cfg: Config, lr_scale: float = 1.0) -> StepControls:
    k = cfg.curriculum
    mask = MaskParams.make(ctl.mask_kind, ctl.mask_prob, k.span_min_len, k.span_max_len, cfg.data.mask_id)
    return StepControls.make(ctl.lr_mult * lr_scale, ctl.mu_scale, mask)


class Throughput:
    """Tokens per second between log steps, and the ETA from the step rate."""

    def __init__(self, tokens_per_step: int, max_steps: int):
        self.tokens_per_step, self.max_steps = tokens_per_step, max_steps
        self.t_mark, self.s_mark, self.start = time.time(), 0, 0
        self.rate: float | None = None  # steps per second

    def restart(self, step: int) -> None:
        self.t_mark, self.s_mark, self.start = time.time(), step, step

    def measure(self, s: int) -> float | None:
        """Tokens per second since the last log step (None right after a (re)start)."""
        now = time.time()
        steps_done = s + 1 - self.s_mark
        tps = None
        # The first step after a (re)start carries dispatch warm-up: no rate from it alone.
        if steps_done > 0 and now > self.t_mark and s > self.start:
            tps = steps_done * self.tokens_per_step / (now - self.t_mark)
            self.rate = steps_done / (now - self.t_mark)
        self.t_mark, self.s_mark = now, s + 1
        return tps

    def eta(self, done: int) -> float | None:
        return (self.max_steps - done) / self.rate if self.rate else None


class TrainLoop:
    """Owns the host side of a run; `run` returns the exit code and sets `status`."""

    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, ckpt: Checkpointer, meta: dict[str, Any]):
        self.cfg, self.setup, self.ckpt = cfg, setup, ckpt
        tc = cfg.training
        self.run_dir = run_dir
        self.research = ResearchState.restore(cfg, setup.locales, setup.has_words, meta)
        self.sinks: list[Sink] = []
        if is_primary():  # one process writes what the run reports
            db = MetricsDB(run_dir / "metrics.sqlite")
            db.start(
                config_lib.config_hash(cfg),
                model_shape(cfg),
                {
                    "lr": cfg.optim.lr,
                    "batch_size": tc.batch_size,
                    "grad_accum_steps": tc.grad_accum_steps,
                    "seq_len": cfg.data.seq_len,
                    "max_steps": tc.max_steps,
                    "seed": tc.seed,
                },
            )
            self.console = Console(tc.max_steps, cfg.logging.progress)
            self.sinks = open_sinks(cfg, run_dir, db, self.console)
        else:
            self.console = Console(tc.max_steps, "lines", io.StringIO())
        validator = Validator(
            setup.windows,
            tc.batch_size,
            setup.graphdef,
            batch_sharding(setup.mesh),
            setup.state_sharding.params,
            replicated(setup.mesh),
        )
        suite = (
            EvalSuite(cfg, setup.corpus, setup.locales, setup.graphdef, setup.streams, setup.mesh)
            if cfg.eval.interval
            else None
        )
        self.hooks: list[Hook] = default_hooks(self, cfg, run_dir, validator, suite, ckpt)
        self.throughput = Throughput(tc.batch_size * tc.grad_accum_steps * cfg.data.seq_len, tc.max_steps)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops()
        self.status, self.done = "completed", 0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.queue: list[tuple[int, dict[str, jax.Array], Controls]] = []  # dispatched, not yet observed
        self.observed = -1

    # -- per-step host work -------------------------------------------------------------
    def observe(self, s: int, dev: dict[str, jax.Array], ctl: Controls) -> None:
        """Metrics of step s (fetched one step late): research state, then logs at log steps."""
        m: dict[str, np.ndarray] = jax.device_get(dev)
        signals: list[Signal] = []
        if s > self.observed and bool(m["nonfinite"]):
            self.observed = s
            self.nonfinite(s, float(m["loss"]), float(m["grad_norm"]))
        elif s > self.observed:  # research state first, so a failure in logging cannot lose it
            self.observed = s
            self.last_loss = float(m["loss"])
            signals = self.research.observe(s, m)
        for sig in signals:
            self.signal(sig)
        tc = self.cfg.training
        if s % tc.log_interval == 0 or s + 1 == tc.max_steps:
            self.write(s, self.train_metrics(s, m, ctl))

    def train_metrics(self, s: int, m: dict[str, np.ndarray], ctl: Controls) -> Metrics:
        """The dict of one log step (telemetry/sink.py lists the namespaces)."""
        r = self.research
        status = r.curriculum.status(s)
        out: Metrics = {
            "train/loss": float(m["loss"]),
            "train/loss_ema": float(m["loss_ema"]),
            "train/grad_norm": float(m["grad_norm"]),
            "train/lr": float(m["lr"]),
            "train/lr_multiplier": ctl.lr_mult,
            "train/mask_prob": ctl.mask_prob,
            "train/phase": float(ctl.phase),
            "curriculum/stuns": float(status["stuns"]),
        }
        for phase in ("wwm", "span"):
            if status[f"{phase}_improvement"] is not None:
                out[f"curriculum/{phase}_improvement"] = status[f"{phase}_improvement"]
        analytics = r.curriculum.analytics["lifetime"].window_stats()
        out.update(
            {
                f"analytics/{k}": v
                for k, v in (
                    ("loss_slope", analytics["slope"]),
                    ("noise_fraction", analytics["noise_fraction"]),
                    ("oscillation_rate", analytics["oscillation_rate"]),
                )
                if v is not None
            }
        )
        out.update({f"locale_ema/{loc}": v for loc, v in r.locale_ema.ema.items() if v is not None})
        out.update({f"task_ema/{k}": v for k, v in r.task_ema.items()})
        tps = self.throughput.measure(s)
        if tps:
            out["system/tokens_per_sec"] = tps
            if self.peak:
                out["system/mfu"] = tps * self.flops_per_token / (self.peak * self.setup.mesh.size)
        eta = self.throughput.eta(s + 1)
        if eta is not None:
            out["system/eta_s"] = eta
        out["system/wall_time"] = time.time()
        return out

    def write(self, step: int, metrics: Metrics) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)

    def signal(self, sig: Signal) -> None:
        for sink in self.sinks:
            sink.signal(sig)

    def nonfinite(self, s: int, loss: float, grad_norm: float) -> None:
        """Step s's update was not applied (the step's guard); the policy decides what follows."""
        tc, r = self.cfg.training, self.research
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {s} (loss {loss}, grad norm {grad_norm})"
        if tc.on_nonfinite == "stop":
            raise Diverged(
                f"{what}; the update was not applied and nothing after it is saved; "
                f'hint: lower optim.lr or set training.on_nonfinite = "rollback"'
            )
        r.nonfinite_events += 1
        if r.nonfinite_events > tc.nonfinite_limit:
            raise Diverged(
                f"{what}: more than training.nonfinite_limit = {tc.nonfinite_limit} "
                f"{'skipped updates' if tc.on_nonfinite == 'skip' else 'rollbacks'}; lower optim.lr"
            )
        if tc.on_nonfinite == "rollback":
            raise Rollback(what)
        self.signal(
            Signal(
                s,
                "nonfinite_skip",
                float(r.nonfinite_events),
                f"{what}: update skipped ({r.nonfinite_events}/{tc.nonfinite_limit})",
            )
        )

    def meta(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "step": step,
            "model_shape": model_shape(cfg),
            "config": config_lib.to_dict(cfg),
            "seed": cfg.training.seed,
            "sampler": {"kind": "fold_in(seed, step)", "next_step": step},
            "research": self.research.state_dict(),
            "corpus_sha256": self.setup.corpus.manifest["content_sha256"],
        }

    # -- the loop -----------------------------------------------------------------------
    def run(self, state: TrainState, step_fn: StepFn, stop: StopFlag) -> int:
        self.done = int(state.step)
        self.throughput.restart(self.done)  # its `start`: the step this launch began at
        self.observed = self.done - 1
        code = 0
        self.state = state
        for hook in self.hooks:  # a fresh run is validated before its first step
            if isinstance(hook, Validation) and self.done == 0 and hook.every:
                hook.run(state.params, 0)
        try:
            while True:
                try:
                    self.steps(step_fn, stop)
                    break
                except Rollback as r:
                    self.state = self.rollback(self.state, str(r))
            if stop.signum is not None:
                self.status, code = "interrupted", 128 + stop.signum
        except Diverged as e:
            self.status, code = "diverged", EXIT_DIVERGED
            self.queue = []
            print_err(f"error: training stopped: {e}; latest checkpoint: {self.ckpt.latest_step() or 'none'}")
        except Exception as e:  # noqa: BLE001 - report in one line, keep what is valid
            self.status, code = "failed", 1
            saved = self._save_after_failure(self.state)
            if out_of_memory(e):  # not a bug: an allocation the estimates (model/memory.py) let through
                code = EXIT_ENVIRONMENT
                print_err(
                    f"error: out of memory on the device after step {self.done} ({first_line(e)}){saved}; latest "
                    f"checkpoint: {self.ckpt.latest_step() or 'none'}; ask for less: a smaller batch, model or "
                    "evaluation"
                )
            else:
                trace = write_traceback(e, self.run_dir / "logs", "train")
                print_err(
                    f"error: training failed after step {self.done}: {type(e).__name__}: {first_line(e)}{saved}; "
                    f"latest checkpoint: {self.ckpt.latest_step() or 'none'}"
                    + (f"; traceback in {trace}" if trace else "")
                )
        finally:
            self.close()
        return 1 if code == 0 and self.status == "failed" else code

    def steps(self, step_fn: StepFn, stop: StopFlag) -> None:
        """Dispatch steps from `self.done` to max_steps (or a stop request), observing one step late;
        `self.state` is always the newest state (a save after a failure or a rollback needs it)."""
        cfg, tc = self.cfg, self.cfg.training
        state = self.state
        everywhere = replicated(self.setup.mesh)
        seed_key = put(jax.random.key(tc.seed), everywhere)
        corpus = self.setup.device_corpus
        last: tuple[Controls, float, StepControls] | None = None
        for s in range(self.done, tc.max_steps):
            ctl = self.research.curriculum.controls(s)
            lr_scale = self.research.lr_scale
            if last is None or last[0] != ctl or last[1] != lr_scale:  # new device scalars only on a change
                last = (ctl, lr_scale, put(step_controls(ctl, cfg, lr_scale), everywhere))
            state, metrics = step_fn(state, corpus, seed_key, last[2])
            self.state, self.done = state, s + 1
            self.queue.append((s, metrics, ctl))
            while len(self.queue) > 1:  # metrics one step late: step s - 1 is done by now
                self.observe(*self.queue.pop(0))
            self.console.progress(self.done, self.throughput.eta(self.done))
            # One decision for every process: a signal to any of them stops all of them at this step.
            agreed = any_process(stop.signum or 0)
            if agreed and stop.signum is None:
                stop.signum = agreed
            end = StepEnd(self.done, state, self.done == tc.max_steps, bool(agreed))
            if any(hook.due(end) for hook in self.hooks):
                # Decisions from step s only act from step s + 2, so observing it now is safe.
                while self.queue:
                    self.observe(*self.queue.pop(0))
            for hook in self.hooks:  # in order: a hook may keep the step for the ones after it
                if hook.due(end):
                    hook(end)
            if agreed:
                return
        while self.queue:
            self.observe(*self.queue.pop(0))

    def rollback(self, state: TrainState, why: str) -> TrainState:
        """Back to the newest checkpoint (finite: the guard never lets a non-finite update in) with
        the learning rate scaled down; the research state comes back with it."""
        self.ckpt.wait()
        step = self.ckpt.latest_step()
        if step is None:
            raise Diverged(
                f"{why}; no checkpoint to roll back to yet (lower optim.lr, or save earlier with "
                "checkpoint.save_interval)"
            )
        events = self.research.nonfinite_events
        scale = self.research.lr_scale * self.cfg.training.rollback_lr_scale
        meta = self.ckpt.read_meta(step)
        restored = self.ckpt.restore(step, state)
        self.research = ResearchState.restore(self.cfg, self.setup.locales, self.setup.has_words, meta)
        self.research.nonfinite_events, self.research.lr_scale = events, scale  # the rollback itself is not undone
        self.queue, self.done, self.observed = [], step, step - 1
        self.signal(
            Signal(
                step,
                "nonfinite_rollback",
                scale,
                f"{why}: rolled back to step {step}, learning rate x{scale:g} "
                f"({events}/{self.cfg.training.nonfinite_limit})",
            )
        )
        return restored

    def close(self) -> None:
        """Finish the checkpoint writer and every sink; each is closed even when another fails,
        and none fails silently."""
        end = RunEnd(self.status, self.done, self.last_loss, self.last_val)
        closers = [("checkpoint writer", self.ckpt.close)] + [
            (type(sink).__name__, lambda sink=sink: sink.close(end)) for sink in self.sinks
        ]
        for name, fn in closers:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - report and go on closing the rest
                msg = f"closing the {name} failed: {type(e).__name__}: {first_line(e)}"
                if self.status == "completed":
                    print_err(f"error: {msg}")
                    self.status = "failed"
                else:  # the failure was reported in its one line; this follows from it
                    logging.getLogger("genesis_jax").error(msg)

    def _save_after_failure(self, state: TrainState) -> str:
        """Save the state reached before a failure, if it is newer than the last checkpoint; says
        what happened, including why a save was impossible."""
        leaves = jax.tree.leaves(state)
        if self.done <= self.throughput.start or any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            return ""
        try:
            self.ckpt.wait()
            step = int(state.step)
            for item in self.queue:  # the checkpoint's research state covers every step before it
                self.observe(*item)
            self.queue = []
            self.ckpt.save(step, state, self.meta(step))
            self.ckpt.wait()
            return f"; saved step {step}"
        except Diverged as e:
            return f"; nothing saved after it ({e})"
        except Exception as e:  # noqa: BLE001
            return f"; could not save after it ({type(e).__name__}: {first_line(e)})"
