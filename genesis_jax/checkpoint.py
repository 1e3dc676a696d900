"""Orbax checkpoints of the full train state plus a JSON record of the host-side research state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .config import CheckpointConfig
from .errors import ResumeError

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "norm_type")


class Checkpointer:
    """Step directories under `<run>/checkpoints`; Orbax writes to a temporary directory and
    renames it when complete, so an interrupted write never replaces a good checkpoint."""

    def __init__(self, directory: Path, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.permanent_interval or None,
            save_interval_steps=1,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=cfg.async_save,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a user-facing condition
            raise ResumeError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from None

    def restore(self, step: int, target: Any) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise ResumeError(f"{self.directory / str(step)}: cannot restore the train state ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_shape(saved_model: dict[str, Any], model: dict[str, Any], where: Path) -> None:
    """Refuse a resume whose checkpoint holds a model of another shape."""
    diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {model.get(k)!r}"
             for k in SHAPE_KEYS if saved_model.get(k) != model.get(k)]
    if diffs:
        raise ResumeError(f"{where}: checkpoint has another model shape ({'; '.join(diffs)}); use a new --run-dir")


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)
