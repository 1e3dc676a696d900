"""What happens between steps on a cadence of its own (Levanter's hooks): validation, the quick
evaluation, checkpoint saves, report snapshots. Each hook has its `every` from the config; the loop keeps only
dispatch, the one-step-late metric queue and the stop agreement, and after each step runs the
hooks that are due, in order. A new cadence is one class here and one line in `default_hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flax import nnx

from ..config.schema import Config, EvalConfig
from ..core.compat import module_available
from ..core.errors import ConfigError, UserError, print_err
from ..evaluation.metrics import go_no_go
from ..evaluation.suite import EvalSuite, Validator
from ..parallel.processes import is_primary
from ..research.curriculum import Signal
from ..research.state import ResearchState
from ..telemetry.report import plot_run
from ..telemetry.sink import Metrics
from .checkpoint import Checkpointer
from .state import TrainState


@dataclass
class StepEnd:
    """What the hooks see after a step: the step count reached and the state it left."""

    done: int
    state: TrainState
    last: bool  # training.max_steps reached
    stopping: bool  # a stop request: every process ends at this step
    keep: bool = False  # set by a hook: this step must be saved and pinned (a grokking signal)


class Host(Protocol):
    """The parts of the loop a hook reports through (train/loop.py, TrainLoop)."""

    research: ResearchState
    last_val: float | None

    def write(self, step: int, metrics: Metrics) -> None: ...

    def signal(self, sig: Signal) -> None: ...

    def meta(self, step: int) -> dict[str, Any]: ...


class Hook(Protocol):
    def due(self, end: StepEnd) -> bool: ...

    def __call__(self, end: StepEnd) -> None: ...


def on_cadence(every: int, end: StepEnd, at_last: bool) -> bool:
    """Every `every` steps (0: never), and at the last step when `at_last`."""
    return bool(every) and (end.done % every == 0 or (at_last and end.last))


class Validation:
    """Held-out cross-entropy every `training.val_interval` steps and at the last; a grokking
    signal it raises keeps that step."""

    def __init__(self, host: Host, validator: Validator, every: int):
        self.host, self.validator, self.every = host, validator, every

    def due(self, end: StepEnd) -> bool:
        return on_cadence(self.every, end, at_last=True)

    def __call__(self, end: StepEnd) -> None:
        end.keep |= self.run(end.state.params, end.done)

    def run(self, params: nnx.State, done: int) -> bool:
        """True when validation raised a grokking signal."""
        vals = self.validator(params)
        if not vals:
            return False
        self.host.last_val = vals["val/loss"]
        grokking = self.host.research.validated(done, vals["val/loss"])
        if grokking is not None:
            self.host.signal(grokking)
        self.host.write(done, vals)
        return grokking is not None


class QuickEvaluation:
    """The quick evaluation suite every `eval.interval` steps: evaluation_logs and TensorBoard
    Eval/quick_*, with the go/no-go verdict as quick/go."""

    def __init__(self, host: Host, suite: EvalSuite, gates: EvalConfig):
        self.host, self.suite, self.gates, self.every = host, suite, gates, gates.interval

    def due(self, end: StepEnd) -> bool:
        return on_cadence(self.every, end, at_last=False)

    def __call__(self, end: StepEnd) -> None:
        results = self.suite.run(end.state.params, quick=True)
        results["go"] = float(not go_no_go(results, self.gates))
        self.host.write(end.done, {f"quick/{k}": v for k, v in results.items()})


class CheckpointSave:
    """A checkpoint every `checkpoint.save_interval` steps, at the last step, at a stop request,
    and at a step another hook keeps (pinned, so retention never drops it)."""

    def __init__(self, host: Host, ckpt: Checkpointer, every: int):
        self.host, self.ckpt, self.every = host, ckpt, every

    def due(self, end: StepEnd) -> bool:
        return on_cadence(self.every, end, at_last=True) or end.stopping or end.keep

    def __call__(self, end: StepEnd) -> None:
        if end.keep:
            self.ckpt.pin(end.done)
        self.ckpt.save(end.done, end.state, self.host.meta(end.done))


class ReportSnapshot:
    """The run's report plots (telemetry/report.py) every `logging.report_interval` steps and at
    the last, from process 0. A snapshot that cannot be written is one warning line; training
    goes on (the plots can be made again at any time with `python -m genesis_jax.report`)."""

    def __init__(self, run_dir: Path, every: int):
        if every and not module_available("matplotlib"):
            raise ConfigError(
                f"logging.report_interval = {every}: report snapshots need matplotlib: "
                "pip install 'genesis-jax[report]', or set it to 0"
            )
        self.run_dir, self.every = run_dir, every

    def due(self, end: StepEnd) -> bool:  # the same in every process: due hooks drain the metric queue
        return on_cadence(self.every, end, at_last=True)

    def __call__(self, end: StepEnd) -> None:
        if not is_primary():
            return
        try:
            plot_run(self.run_dir)
        except (UserError, OSError) as e:
            print_err(f"warning: report snapshot at step {end.done} not written ({e}); training goes on")


def default_hooks(
    host: Host, cfg: Config, run_dir: Path, validator: Validator, suite: EvalSuite | None, ckpt: Checkpointer
) -> list[Hook]:
    """In the order they run: validation may keep a step, so the save comes after it; the report
    plots what the step logged."""
    hooks: list[Hook] = [Validation(host, validator, cfg.training.val_interval)]
    if suite is not None:
        hooks.append(QuickEvaluation(host, suite, cfg.eval))
    hooks.append(CheckpointSave(host, ckpt, cfg.checkpoint.save_interval))
    if cfg.logging.report_interval:
        hooks.append(ReportSnapshot(run_dir, cfg.logging.report_interval))
    return hooks
