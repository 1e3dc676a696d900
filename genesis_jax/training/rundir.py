"""The run directory: its lock (one training process at a time; readers need none), and
loading a trained model out of it for evaluation and generation."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import config as config_lib
from ..config.schema import Config
from ..core.errors import UserError
from ..core.writing import open_lock_file
from ..model.llama import Llama
from .checkpoint import Checkpointer, check_shape
from .state import init_model, init_state
from .step import tree_all_finite

LOCK_NAME = "train.lock"
WRITTEN = (
    LOCK_NAME,
    "metrics.sqlite",
    "metrics.sqlite-journal",
    "config.toml",
    "logs",
    "logs/libraries.log",
    "checkpoints",
    "tensorboard",
    "reports",
)


class RunLockedError(UserError):
    """Another live process trains in this run directory."""

    exit_code = 3


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """An exclusive `flock` on `<run>/train.lock`, which also records its holder (pid, host, start).

    The kernel drops the flock when its holder dies, so a crashed run never blocks the next
    launch; the recorded holder names who holds a live lock, and who left a stale one."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLockedError; returns a message when a stale lock was taken over."""
        fd = open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd)
            os.close(fd)
            who = describe(holder) if holder else "another process"
            raise RunLockedError(
                f"{self.path.parent}: run directory in use by {who}; wait for it to finish or choose another --run-dir"
            ) from None
        previous = self._read(fd)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous and (previous.get("host") != mine["host"] or not pid_alive(int(previous.get("pid", -1)))):
            return f"took over a stale lock left by {describe(previous)}"
        return None

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (ValueError, UnicodeDecodeError, OSError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder to call stale
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def prepare(run_dir: Path) -> None:
    """Create the run directory, or say in one line why it cannot be one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir}: not writable")
    for name in WRITTEN:  # files a run opens for appending or in place: a planted link would redirect them
        if (run_dir / name).is_symlink():
            raise UserError(
                f"{run_dir / name}: a symbolic link where the run writes its own file; remove it "
                "(genesis-jax never writes through links)"
            )


@dataclass
class LoadedRun:
    cfg: Config
    model: Llama
    step: int
    meta: dict[str, Any]


def load_run(run_dir: Path, step: int | None = None) -> LoadedRun:
    """The run's resolved config and the model weights of checkpoint `step` (default: latest)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = config_lib.load(run_dir / "config.toml")
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: no checkpoints yet")
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        steps = ckpt.manager.all_steps()
        if not steps:
            raise UserError(f"{run_dir}: no checkpoints yet")
        chosen = max(steps) if step is None else step
        if chosen not in steps:
            raise UserError(
                f"--step {step}: no such checkpoint in {run_dir} (have {', '.join(map(str, sorted(steps)))})"
            )
        meta = ckpt.read_meta(chosen)
        check_shape(meta, cfg, run_dir)
        model = init_model(cfg)
        state = ckpt.restore(chosen, init_state(cfg, model))
    finally:
        ckpt.close()
    if not bool(tree_all_finite(state.params)):
        bad = [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_leaves_with_path(state.params)
            if not bool(jnp.isfinite(x).all())
        ]
        raise UserError(
            f"{run_dir}: checkpoint {chosen} has non-finite parameters ({len(bad)} arrays, e.g. {bad[0]}): "
            "it was saved after training diverged; choose an earlier one with --step"
        )
    nnx.update(model, state.params)
    return LoadedRun(cfg=cfg, model=model, step=chosen, meta=meta)
