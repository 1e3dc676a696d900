"""The checkpoint's research record is the state at the save, whatever the loop does next."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from genesis_jax.config.schema import CheckpointConfig
from genesis_jax.training.checkpoint import Checkpointer


def test_async_save_records_meta_as_it_was_at_the_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(async_save=True))
    ema = {"cross_ref/loss": 0.5}
    history = [(10, 2.0)]
    meta = {"step": 10, "task_ema": ema, "val_history": history}
    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    ckpt.save(10, state, meta)
    # The loop keeps updating its live objects while the save finishes in the background.
    ema["cross_ref/loss"] = 0.25
    history.append((20, 1.0))
    ckpt.wait()
    got = ckpt.read_meta(10)
    ckpt.close()
    assert got["task_ema"] == {"cross_ref/loss": 0.5}
    assert [list(x) for x in got["val_history"]] == [[10, 2.0]]
