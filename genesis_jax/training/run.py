"""A training run from start to end: the run directory's lock and logs, building the run,
resuming it or starting it from an export, the loop, and stopping on a signal
(`python -m genesis_jax.train` is a thin command over `train`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from .. import config as config_lib
from ..config.schema import Config
from ..core.errors import UserError, print_err
from ..core.host_memory import huge_pages_state
from ..core.writing import write_file
from ..data.host import corpus_identity
from ..data.masks import MaskParams
from ..parallel.processes import is_primary
from .build import build, compile_step
from .checkpoint import Checkpointer, RefusedResume, check_shape
from .loop import TrainLoop
from .rundir import RunLock, prepare
from .state import start_from_pretrained
from .step import StepControls


class StopRequested:
    """SIGINT/SIGTERM: the first sets `signum`, and the loop saves at the current step and exits;
    the second ends the process at once, whatever it is waiting on.

    Python runs signal handlers on the main thread only, between bytecodes, and the kernel may
    deliver the signal to any of JAX's or Orbax's threads: a main thread blocked in a native wait
    would never see it. The C-level handler writes every signal number to a wakeup pipe from
    whichever thread it runs on, so a watcher thread reads it there and acts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.pipe: tuple[int, int] | None = None
        self.previous_fd = -1

    def install(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        self.pipe = (r, w)
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, lambda signum, frame: None)  # the watcher acts
        self.previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="stop-requested", daemon=True).start()

    def _watch(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                if self.signum is not None:
                    print_err(
                        f"second signal {signum}: stopped at once; the run directory keeps its latest complete checkpoint"
                    )
                    os._exit(128 + signum)
                self.signum = signum
                print_err(f"signal {signum}: saving at the current step, then stopping (a second signal stops at once)")

    def uninstall(self) -> None:
        if self.pipe is None:
            return
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        for fd in self.pipe:  # the watcher's read fails or ends, and it returns
            os.close(fd)
        self.pipe = None


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
    write_file(run_dir / "config.toml", config_lib.to_toml(cfg))


def train(cfg: Config, run_dir: Path, allow_corpus_change: bool = False, own_process: bool = False) -> int:
    """Run or resume training in `run_dir` under its lock; returns the process exit code.

    `own_process`: the process ends with this run, so library logs stay routed to the run's
    log file until exit (background writers report at shutdown too); otherwise the routing is
    undone on return, for a caller that goes on."""
    prepare(run_dir)
    lock = RunLock(run_dir) if is_primary() else None  # one lock per run: process 0 holds it
    took_over = lock.acquire() if lock else None
    if took_over:
        print_err(f"{run_dir}: {took_over}")
    name = "libraries.log" if is_primary() else f"libraries-{jax.process_index()}.log"
    restore_logs = route_library_logs(run_dir / "logs" / name)
    try:
        return train_locked(cfg, run_dir, allow_corpus_change)
    finally:
        if not own_process:
            restore_logs()
        if lock:
            lock.release()


def train_locked(cfg: Config, run_dir: Path, allow_corpus_change: bool) -> int:
    t_start = time.time()
    setup = build(cfg)
    diffs = config_changes(cfg, run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    corpus_sha = str(setup.corpus.manifest["content_sha256"])

    def accept(step: int, meta: dict[str, Any]) -> None:
        check_shape(meta, cfg, run_dir)
        check_corpus(meta, corpus_sha, run_dir, allow_corpus_change)
        if step > cfg.training.max_steps:
            raise RefusedResume(
                f"training.max_steps = {cfg.training.max_steps}: below the checkpoint's step {step} in "
                f"{run_dir}; raise it to continue, or use a new --run-dir"
            )

    resumed = ckpt.resume(setup.state, accept)
    state, meta = setup.state, {}
    if resumed is not None:
        latest, state, meta = resumed
        print_err(f"resuming {run_dir} from step {latest}")
        for line in diffs:
            print_err(f"  changed since the last launch: {line}")
    elif cfg.training.init_from:
        state = start_from_pretrained(state, setup.state_sharding, cfg)
        print_err(f"starting from the weights in {cfg.training.init_from} (optimizer state fresh)")
    if is_primary():
        write_config(cfg, run_dir)  # only once the resume is known to be possible

    loop = TrainLoop(cfg, run_dir, setup, ckpt, meta)  # opens the logs: a broken one fails before compiling
    t_compile = time.time()
    try:
        step_fn = compile_step(cfg, setup, StepControls.make(mask=MaskParams.make(mask_id=cfg.data.mask_id)))
    except BaseException:
        loop.status = "failed"
        loop.close()
        raise
    compile_s = time.time() - t_compile
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    loop.console.print(
        f"run {run_dir} | {n_params:,} parameters | {len(setup.locales)} locales | "
        f"{int(setup.device_corpus.valid_cum[-1]):,} train windows | {len(setup.windows.locale)} val windows | "
        f"{setup.mesh.size} {jax.default_backend()} device(s) | step compiled in {compile_s:.1f}s | "
        f"host huge pages {huge_pages_state()}"
    )
    stop = StopRequested()
    stop.install()
    try:
        code = loop.run(state, step_fn, stop)
    finally:
        stop.uninstall()
    if loop.status == "interrupted":
        print_err(
            f"interrupted by signal {stop.signum} after step {loop.done}; checkpoint saved; run the same command to resume"
        )
    elif loop.status == "completed":
        loop.console.print(f"done: {loop.done} steps in {time.time() - t_start:.0f}s; run directory {run_dir}")
    return code


def route_library_logs(path: Path) -> Callable[[], None]:
    """Libraries' log records (Orbax's background-thread tracebacks among them) go to a file in
    the run directory, not the console, which keeps one line per event; returns the undo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook, sys.unraisablehook)
    for h in saved[0]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log = logging.getLogger("genesis_jax.uncaught")
    # Callbacks of background threads (tensorstore's, on a failing write) report through these hooks.
    sys.excepthook = lambda t, v, tb: log.error("uncaught exception", exc_info=(t, v, tb))
    threading.excepthook = lambda a: log.error(
        "exception in thread %s", a.thread, exc_info=(a.exc_type, a.exc_value, a.exc_traceback)
    )  # type: ignore[arg-type]
    sys.unraisablehook = lambda u: log.error("exception ignored in %r: %r", u.object, u.exc_value)

    def restore() -> None:
        root.removeHandler(handler)
        handler.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved[2], saved[3], saved[4]

    return restore


def check_corpus(meta: dict[str, Any], corpus_sha: str, run_dir: Path, allow_change: bool) -> None:
    """A run continues on the corpus it trained on, unless the user says otherwise."""
    trained_on = meta.get("corpus_sha256")
    if trained_on is None or trained_on == corpus_sha:
        return
    if not allow_change:
        raise RefusedResume(
            f"{run_dir}: its checkpoints were trained on corpus {trained_on[:16]}, data.corpus now has "
            f"{corpus_sha[:16]}; pass --allow-corpus-change to continue on it, or use a new --run-dir"
        )
    print_err(f"continuing on another corpus ({trained_on[:16]} -> {corpus_sha[:16]}), as --allow-corpus-change asks")


def fingerprint(cfg: Config, run_dir: Path, num_processes: int | None) -> dict[str, str]:
    """What every process of one run must share: the resolved config, the corpus's content, the
    run directory and the process count each was told (the coordinator's alone is not checked)."""
    items = {f"{s}.{k}": json.dumps(v) for s, body in config_lib.to_dict(cfg).items() for k, v in body.items()}
    items["corpus content"] = corpus_identity(cfg.data)
    items["--run-dir"] = str(run_dir.resolve())
    items["--num-processes"] = str(num_processes if num_processes is not None else jax.process_count())
    return items
