"""Orbax checkpoints of the full train state plus a JSON record of the host-side research state."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ..config.schema import CheckpointConfig, Config
from ..core.errors import ResumeError, print_err
from ..core.writing import write_file

State = TypeVar("State")  # the train state pytree (any pytree of arrays)
Meta = dict[str, Any]  # a checkpoint's JSON metadata

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "norm_type")


UNRESTORABLE = "checkpoints-unrestorable"  # beside checkpoints/: steps that failed to restore, kept


class RefusedResume(ResumeError):
    """A readable checkpoint that this launch must not continue from (the user's choice decides)."""


@dataclasses.dataclass
class PinnedSteps(pp.PreservationPolicy):
    """Keeps the steps in a set that grows during the run (grokking checkpoints)."""

    pinned: set[int]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        return [c.step in self.pinned for c in checkpoints]


class Checkpointer:
    """Step directories under `<run>/checkpoints`; Orbax writes to a temporary directory and
    renames it when complete, so an interrupted write never replaces a good checkpoint.
    Retention keeps the last `keep`, every multiple of `permanent_interval`, and pinned steps
    (listed in `checkpoints/pinned.json`, so they survive resumes)."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, read_only: bool = False):
        """`read_only` for readers of a possibly live run (eval, generate): they must never clean
        up the temporary directory of a checkpoint that the training process is writing."""
        self.directory = Path(directory).absolute()
        self.pinned_file = self.directory / "pinned.json"
        self.pinned = read_pinned(self.pinned_file)
        policies: list[Any] = [pp.LatestN(cfg.keep), PinnedSteps(self.pinned)]
        if cfg.permanent_interval:
            policies.append(pp.EveryNSteps(cfg.permanent_interval))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            enable_async_checkpointing=cfg.async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def pin(self, step: int) -> None:
        """Never delete `step` (it must be saved, now or already)."""
        self.pinned.add(step)
        if jax.process_index() != 0:  # every process keeps the set; one writes it
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_file(self.pinned_file, json.dumps(sorted(self.pinned)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Meta) -> bool:
        """An async save writes `meta` in the background: it is snapshotted here, because the
        loop goes on mutating the objects it holds (EMAs, histories)."""
        if step in self.manager.all_steps():
            return False
        snapshot = json.loads(json.dumps(meta))
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(snapshot)),
            force=True,
        )

    def read_meta(self, step: int) -> Meta:
        path = self.directory / str(step) / "meta"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a user-facing condition
            raise ResumeError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from None

    def restore(self, step: int, target: State) -> State:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise ResumeError(
                f"{self.directory / str(step)}: cannot restore the train state ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        return restored["state"]

    def resume(self, target: State, accept: Callable[[int, Meta], None]) -> tuple[int, State, Meta] | None:
        """Restore the newest checkpoint that restores: (step, state, meta), or None if there is none.

        A checkpoint that cannot be read is moved aside to `<run>/checkpoints-unrestorable/`
        (never deleted) with a message, and the next older one is tried. `accept(step, meta)`
        raises for a checkpoint this run must not continue from (another model shape, another
        corpus): that is the user's decision, so there is no fallback past it."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
                accept(step, meta)
                state = self.restore(step, target)
            except RefusedResume:
                raise
            except ResumeError as e:
                failures.append(f"step {step}: {e}")
                print_err(f"checkpoint {step} does not restore: {e}")
                if jax.process_index() == 0:  # one process moves it; every process tries the next
                    print_err(f"  moved to {self.set_aside(step)}; trying the next older one")
                continue
            return step, state, meta
        if failures:
            raise ResumeError(
                f"{self.directory}: no checkpoint restores ({len(failures)} tried and moved to "
                f"{self.directory.parent / UNRESTORABLE}); move one back or use a new --run-dir"
            )
        return None

    def set_aside(self, step: int) -> Path:
        """Move a step directory out of the manager's sight, keeping its bytes for inspection."""
        dest_dir = self.directory.parent / UNRESTORABLE
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.directory / str(step), dest)
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_pinned(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    try:
        steps = json.loads(path.read_text(encoding="utf-8"))
        return {int(x) for x in steps}
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ResumeError(
            f"{path}: damaged list of pinned checkpoint steps ({e}); fix it (a JSON list of steps) "
            "or remove it to unpin them"
        ) from None


SHAPE_DEFAULTS = {"mtl_head_dim": 0}  # what a checkpoint written before a key existed had


def model_shape(cfg: Config) -> dict[str, Any]:
    """What a checkpoint's parameter shapes depend on (a resume must match it)."""
    return {
        **{k: getattr(cfg.model, k) for k in SHAPE_KEYS},
        "mtl_head_dim": cfg.mtl.head_dim if cfg.mtl.enabled else 0,
    }


def check_shape(meta: dict[str, Any], cfg: Config, where: Path) -> None:
    """Refuse a resume whose checkpoint (its `meta`) holds a model of another shape."""
    saved, current = meta.get("model_shape", {}), model_shape(cfg)
    diffs = [
        f"{'model.' + k if k in SHAPE_KEYS else k}: checkpoint {saved.get(k, SHAPE_DEFAULTS.get(k))!r}, config {v!r}"
        for k, v in current.items()
        if saved.get(k, SHAPE_DEFAULTS.get(k)) != v
    ]
    if diffs:
        raise RefusedResume(f"{where}: checkpoint has another model shape ({'; '.join(diffs)}); use a new --run-dir")
