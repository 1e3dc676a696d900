"""The training loop: dispatch, one-step-late metrics, curriculum, validation, logs, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import config as config_lib
from .analytics import LocaleEMA, validation_drop
from .checkpoint import Checkpointer, model_shape
from .cli import first_line, write_traceback
from .config import Config
from .curriculum import PHASE_NAMES, Controls, Curriculum, Signal
from .eval_metrics import console_summary, go_no_go
from .eval_suite import EvalSuite, Validator
from .flops import peak_flops, train_flops_per_token
from .logs import Console, MetricsDB, TensorBoard, format_line, print_err
from .runtime import Setup
from .sampler import MaskParams
from .step import StepControls, TrainState
from .tasks import TASK_NAMES


EXIT_DIVERGED = 4


class Diverged(Exception):
    """Training cannot go on: non-finite values under the `stop` policy, or past the limit."""


class Rollback(Exception):
    """A non-finite update under the `rollback` policy: restart from the newest checkpoint."""


def step_controls(ctl: Controls, cfg: Config, lr_scale: float = 1.0) -> StepControls:
    k = cfg.curriculum
    mask = MaskParams.make(ctl.mask_kind, ctl.mask_prob, k.span_min_len, k.span_max_len, cfg.data.mask_id)
    return StepControls.make(ctl.lr_mult * lr_scale, ctl.mu_scale, mask)


class TrainLoop:
    """Owns the host side of a run; `run` returns the exit code and sets `status`."""

    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, ckpt: Checkpointer, meta: dict[str, Any]):
        self.cfg, self.setup, self.ckpt = cfg, setup, ckpt
        tc = cfg.training
        self.run_dir = run_dir
        self.load_research(meta)
        self.db = MetricsDB(run_dir / "metrics.sqlite")
        self.db.start(config_lib.config_hash(cfg), model_shape(cfg),
                      {"lr": cfg.optim.lr, "batch_size": tc.batch_size, "grad_accum_steps": tc.grad_accum_steps,
                       "seq_len": cfg.data.seq_len, "max_steps": tc.max_steps, "seed": tc.seed})
        self.tb = TensorBoard(run_dir / "tensorboard" if cfg.logging.tensorboard else None)
        self.console = Console(tc.max_steps, cfg.logging.progress)
        self.validator = Validator(setup.windows, tc.batch_size, setup.graphdef, NamedSharding(setup.mesh, P("data")))
        self.suite = (EvalSuite(cfg, setup.corpus, setup.locales, setup.graphdef, setup.streams)
                      if cfg.eval.interval else None)
        self.tokens_per_step = tc.batch_size * tc.grad_accum_steps * cfg.data.seq_len
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops()
        self.status, self.done = "completed", 0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.rate: float | None = None
        self.t_mark, self.s_mark, self.start = time.time(), 0, 0
        self.queue: list[tuple[int, dict[str, jax.Array], Controls]] = []  # dispatched, not yet observed
        self.observed = -1

    def load_research(self, meta: dict[str, Any]) -> None:
        """The host-side research state of a checkpoint's meta (fresh when it is empty)."""
        cfg = self.cfg
        self.curriculum = Curriculum(cfg.curriculum, cfg.training.log_interval, self.setup.has_words)
        self.locale_ema = LocaleEMA(self.setup.locales, cfg.curriculum.locale_ema_decay)
        if "curriculum" in meta:
            self.curriculum.load_state_dict(meta["curriculum"])
        if "locale_ema" in meta:
            self.locale_ema.load_state_dict(meta["locale_ema"])
        self.val_history: list[tuple[int, float]] = [(int(s), float(v)) for s, v in meta.get("val_history", [])]
        self.task_ema: dict[str, float] = dict(meta.get("task_ema", {}))  # "coherence/loss" -> EMA over its micro-batches
        self.last_grokking = int(meta.get("last_grokking", -(10**12)))
        guard = meta.get("nonfinite", {})
        self.nonfinite_events = int(guard.get("events", 0))  # skipped updates or rollbacks so far
        self.lr_scale = float(guard.get("lr_scale", 1.0))  # product of the rollbacks' LR scales

    # -- per-step host work -------------------------------------------------------------
    def observe(self, s: int, dev: dict[str, jax.Array], ctl: Controls) -> None:
        """Metrics of step s (fetched one step late): curriculum, telemetry, logs at log steps."""
        m = jax.device_get(dev)
        loss, ema = float(m["loss"]), float(m["loss_ema"])
        signals = []
        if s > self.observed and bool(m["nonfinite"]):
            self.observed = s
            self.nonfinite(s, loss, float(m["grad_norm"]))
        elif s > self.observed:  # research state first, so a failure in logging cannot lose it
            self.observed = s
            self.last_loss = loss
            self.locale_ema.update([float(x) for x in m["locale_loss_sum"]], [float(x) for x in m["locale_count"]])
            self._update_tasks(m)
            signals = self.curriculum.observe(s, loss, ema)
        for sig in signals:
            self.signal(sig)
        tc = self.cfg.training
        if s % tc.log_interval == 0 or s + 1 == tc.max_steps:
            self.log(s, m, ctl)

    def nonfinite(self, s: int, loss: float, grad_norm: float) -> None:
        """Step s's update was not applied (the step's guard); the policy decides what follows."""
        tc = self.cfg.training
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {s} (loss {loss}, grad norm {grad_norm})"
        if tc.on_nonfinite == "stop":
            raise Diverged(f"{what}; the update was not applied and nothing after it is saved; "
                           f"hint: lower optim.lr or set training.on_nonfinite = \"rollback\"")
        self.nonfinite_events += 1
        if self.nonfinite_events > tc.nonfinite_limit:
            raise Diverged(f"{what}: more than training.nonfinite_limit = {tc.nonfinite_limit} "
                           f"{'skipped updates' if tc.on_nonfinite == 'skip' else 'rollbacks'}; lower optim.lr")
        if tc.on_nonfinite == "rollback":
            raise Rollback(what)
        self.signal(Signal(s, "nonfinite_skip", float(self.nonfinite_events),
                           f"{what}: update skipped ({self.nonfinite_events}/{tc.nonfinite_limit})"))

    def _update_tasks(self, m: dict[str, Any]) -> None:
        decay = self.cfg.mtl.task_ema_decay
        for name in TASK_NAMES[1:]:
            if float(m.get(f"task/{name}/count", 0.0)) > 0:
                for what in ("loss", "acc"):
                    v, k = float(m[f"task/{name}/{what}"]), f"{name}/{what}"
                    self.task_ema[k] = v if k not in self.task_ema else decay * self.task_ema[k] + (1 - decay) * v

    def signal(self, sig: Signal) -> None:
        self.db.log_signal(sig.step, sig.kind, sig.value, sig.description)
        self.tb.scalars(sig.step, {f"Signals/{sig.kind}": sig.value})
        self.console.print(f"signal {sig.kind} at step {sig.step}: {sig.description}")

    def log(self, s: int, m: dict[str, Any], ctl: Controls) -> None:
        tc = self.cfg.training
        now = time.time()
        steps_done = s + 1 - self.s_mark
        # The first step after a (re)start carries dispatch warm-up: no rate from it alone.
        measured = steps_done > 0 and now > self.t_mark and s > self.start
        tps = steps_done * self.tokens_per_step / (now - self.t_mark) if measured else None
        self.rate = steps_done / (now - self.t_mark) if measured else self.rate
        self.t_mark, self.s_mark = now, s + 1
        eta = (tc.max_steps - s - 1) / self.rate if self.rate else None
        status = self.curriculum.status(s)
        row = {"step": s, "loss": float(m["loss"]), "loss_ema": float(m["loss_ema"]), "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "mask_prob": ctl.mask_prob, "phase": ctl.phase,
               "wwm_improvement": status["wwm_improvement"], "span_improvement": status["span_improvement"],
               "tokens_per_sec": tps, "wall_time": now}
        self.db.log_train(row)
        emas = {loc: v for loc, v in self.locale_ema.ema.items() if v is not None}
        self.db.log_languages(s, {loc: (v, None) for loc, v in emas.items()})
        analytics = self.curriculum.analytics["lifetime"].window_stats()
        scalars = {"Train/Loss": row["loss"], "Train/LossEMA": row["loss_ema"], "Train/LR": row["lr"],
                   "Train/GradNorm": row["grad_norm"], "Train/MaskProb": ctl.mask_prob, "Train/Phase": float(ctl.phase),
                   "Train/LRMultiplier": ctl.lr_mult,
                   **{f"Research/EMA_Loss_{loc}": v for loc, v in emas.items()},
                   **{f"Research/{k}": v for k, v in (("LossSlope", analytics["slope"]),
                                                      ("NoiseFraction", analytics["noise_fraction"]),
                                                      ("OscillationRate", analytics["oscillation_rate"])) if v is not None}}
        if status["wwm_improvement"] is not None:
            scalars["Research/WWM_Improvement"] = status["wwm_improvement"]
        if status["span_improvement"] is not None:
            scalars["Research/Span_Improvement"] = status["span_improvement"]
        if tps:
            scalars["System/TokensPerSec"] = tps
            if self.peak:
                scalars["System/MFU"] = tps * self.flops_per_token / (self.peak * self.setup.mesh.size)
        if self.task_ema:
            scalars.update({f"Tasks/{k.replace('/', '_')}": v for k, v in self.task_ema.items()})
            self.db.log_eval(s, {f"task/{k}_ema": v for k, v in self.task_ema.items()})
        self.tb.scalars(s, scalars)
        extra = {"phase_name": PHASE_NAMES[ctl.phase], "improvement": status["wwm_improvement"] if ctl.phase == 2
                 else status["span_improvement"], "lr_mult": ctl.lr_mult, "stuns": status["stuns"],
                 "stun_max": self.cfg.curriculum.stun_max_count}
        line = format_line({**row, **extra}, tc.max_steps, eta)
        if self.task_ema:
            line += " | " + " ".join(f"{n[:4]} {self.task_ema[f'{n}/loss']:.3f}/{100 * self.task_ema[f'{n}/acc']:.0f}%"
                                     for n in TASK_NAMES[1:] if f"{n}/loss" in self.task_ema)
        self.console.print(line)

    def validate(self, params: Any, done: int) -> bool:
        """Run validation; True when it raised a grokking signal (that step must be saved and pinned)."""
        vals = self.validator(params)
        if not vals:
            return False
        tc, locales = self.cfg.training, self.setup.locales
        self.last_val = vals["val/loss"]
        grokked = self._grokking(done, vals["val/loss"])
        self.val_history.append((done, vals["val/loss"]))
        self.db.log_eval(done, vals)
        self.db.log_languages(done, {loc: (None, vals[f"val/loss/{loc}"]) for loc in locales if f"val/loss/{loc}" in vals})
        self.tb.scalars(done, {"Eval/" + k.split("/", 1)[1].replace("/", "_"): v for k, v in vals.items()})
        self.console.print(f"val  {done:>7d}/{tc.max_steps} | loss {vals['val/loss']:.4f} | ppl {vals['val/ppl']:.2f} | "
                           f"bpb {vals['val/bpb']:.3f} | " + " ".join(f"{loc} {vals[f'val/loss/{loc}']:.3f}"
                                                                   for loc in locales if f"val/loss/{loc}" in vals))
        return grokked

    def _grokking(self, done: int, loss: float) -> bool:
        e = self.cfg.eval
        if e.grokking_drop <= 0 or done < e.grokking_min_step or done - self.last_grokking < e.grokking_window:
            return False
        drop = validation_drop(self.val_history, done, loss, e.grokking_window)
        if drop is None or drop < e.grokking_drop:
            return False
        self.last_grokking = done
        self.signal(Signal(done, "grokking", drop, f"validation loss fell {100 * drop:.1f}% within {e.grokking_window} "
                           f"steps (>= {100 * e.grokking_drop:.0f}%); checkpoint {done} pinned"))
        return True

    def evaluate(self, params: Any, done: int) -> None:
        """The quick evaluation suite during training: evaluation_logs and TensorBoard Eval/*."""
        assert self.suite is not None
        results = self.suite.run(params, quick=True)
        failed = go_no_go(results, self.cfg)
        results["go"] = float(not failed)
        self.db.log_eval(done, {f"quick/{k}": v for k, v in results.items()})
        self.tb.scalars(done, {"Eval/quick_" + k.replace("/", "_"): v for k, v in results.items()})
        headline = console_summary(results)
        self.console.print(f"eval {done:>7d}/{self.cfg.training.max_steps} | quick suite: "
                           + ("GO" if not failed else "NO-GO (" + "; ".join(failed) + ")") + (f" | {headline}" if headline else ""))

    def meta(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        return {"step": step, "model_shape": model_shape(cfg), "config": config_lib.to_dict(cfg),
                "seed": cfg.training.seed, "sampler": {"kind": "fold_in(seed, step)", "next_step": step},
                "curriculum": self.curriculum.state_dict(), "locale_ema": self.locale_ema.state_dict(),
                "val_history": self.val_history, "last_grokking": self.last_grokking, "task_ema": self.task_ema,
                "nonfinite": {"events": self.nonfinite_events, "lr_scale": self.lr_scale},
                "corpus_sha256": self.setup.corpus.manifest["content_sha256"]}

    # -- the loop -----------------------------------------------------------------------
    def run(self, state: TrainState, step_fn: Any, stop: Any) -> int:
        tc = self.cfg.training
        self.start = self.done = self.s_mark = int(state.step)
        self.observed = self.start - 1
        code = 0
        self.state = state
        if self.start == 0 and tc.val_interval:
            self.validate(state.params, 0)
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
            trace = write_traceback(e, self.run_dir / "logs", "train")
            print_err(f"error: training failed after step {self.done}: {type(e).__name__}: {first_line(e)}{saved}; "
                      f"latest checkpoint: {self.ckpt.latest_step() or 'none'}" + (f"; traceback in {trace}" if trace else ""))
        finally:
            self.close()
        return 1 if code == 0 and self.status == "failed" else code

    def steps(self, step_fn: Any, stop: Any) -> None:
        """Dispatch steps from `self.done` to max_steps (or a stop request), observing one step late;
        `self.state` is always the newest state (a save after a failure or a rollback needs it)."""
        cfg, tc = self.cfg, self.cfg.training
        state = self.state
        seed_key = jax.random.key(tc.seed)
        corpus = self.setup.device_corpus
        last: tuple[Controls, float, StepControls] | None = None
        for s in range(self.done, tc.max_steps):
            ctl = self.curriculum.controls(s)
            if last is None or last[0] != ctl or last[1] != self.lr_scale:  # new device scalars only on a change
                last = (ctl, self.lr_scale, step_controls(ctl, cfg, self.lr_scale))
            state, metrics = step_fn(state, corpus, seed_key, last[2])
            self.state, self.done = state, s + 1
            self.queue.append((s, metrics, ctl))
            while len(self.queue) > 1:  # metrics one step late: step s - 1 is done by now
                self.observe(*self.queue.pop(0))
            self.console.progress(self.done, (tc.max_steps - self.done) / self.rate if self.rate else None)
            val_due = tc.val_interval and (self.done % tc.val_interval == 0 or self.done == tc.max_steps)
            save_due = (self.done % cfg.checkpoint.save_interval == 0 or self.done == tc.max_steps
                        or stop.signum is not None)
            if val_due or save_due:
                # Decisions from step s only act from step s + 2, so observing it now is safe.
                while self.queue:
                    self.observe(*self.queue.pop(0))
            if val_due and self.validate(state.params, self.done):
                self.ckpt.pin(self.done)
                save_due = True
            if self.suite is not None and self.done % cfg.eval.interval == 0:
                self.evaluate(state.params, self.done)
            if save_due:
                self.ckpt.save(self.done, state, self.meta(self.done))
            if stop.signum is not None:
                return
        while self.queue:
            self.observe(*self.queue.pop(0))

    def rollback(self, state: TrainState, why: str) -> TrainState:
        """Back to the newest checkpoint (finite: the guard never lets a non-finite update in) with
        the learning rate scaled down; the research state comes back with it."""
        self.ckpt.wait()
        step = self.ckpt.latest_step()
        if step is None:
            raise Diverged(f"{why}; no checkpoint to roll back to yet (lower optim.lr, or save earlier with "
                           "checkpoint.save_interval)")
        events = self.nonfinite_events
        scale = self.lr_scale * self.cfg.training.rollback_lr_scale
        meta = self.ckpt.read_meta(step)
        restored = self.ckpt.restore(step, state)
        self.load_research(meta)
        self.nonfinite_events, self.lr_scale = events, scale  # the rollback itself is not undone
        self.queue, self.done, self.observed = [], step, step - 1
        self.signal(Signal(step, "nonfinite_rollback", scale,
                           f"{why}: rolled back to step {step}, learning rate x{scale:g} "
                           f"({events}/{self.cfg.training.nonfinite_limit})"))
        return restored

    def close(self) -> None:
        """Finish every sink; each is closed even when another fails, and none fails silently."""
        for name, fn in (("checkpoint writer", self.ckpt.close), ("console", self.console.close),
                         ("metrics database", lambda: self.db.finish(self.status, self.done, self.last_loss, self.last_val)),
                         ("metrics database", self.db.close), ("tensorboard", self.tb.close)):
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
        if self.done <= self.start or any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
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
