"""One run over several processes (one per host, or several on one host for tests): JAX's
multi-controller runtime. Every process runs the same program on its own devices; process 0
alone writes the console, the logs and the lock; all take part in checkpoints.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from .compat import persistent_cache_unsafe
from .errors import UserError
from .ranges import COUNT, COUNT0, flag


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address; starts one process of a run")
    g.add_argument("--num-processes", type=flag(COUNT), help="processes in the run (with --coordinator)")
    g.add_argument("--process-id", type=flag(COUNT0), help="this process's rank, 0..num-processes-1 (with --coordinator)")
    g.add_argument("--distributed", action="store_true",
                   help="let JAX detect the cluster (SLURM, Open MPI) and initialise from it")
    g.add_argument("--heartbeat-timeout", type=flag(COUNT), default=60, metavar="S",
                   help="seconds after which the others stop when a process is gone (default 60)")


def initialize(args: argparse.Namespace) -> None:
    """Join the run before anything touches a device; no-op for a single-process run."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in explicit):
        return
    if not args.distributed and any(x is None for x in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together (or use --distributed)")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id {args.process_id}: must be within [0, --num-processes {args.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives of CPU devices across processes
    kwargs = {} if args.distributed else {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
                                          "process_id": args.process_id}
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=args.heartbeat_timeout)
    if why := persistent_cache_unsafe(jax.default_backend(), jax.process_count()):
        jax.config.update("jax_enable_compilation_cache", False)
        if jax.config.jax_compilation_cache_dir and is_primary():
            print(f"note: the persistent compilation cache is off for this run: {why}", file=sys.stderr)


def is_primary() -> bool:
    return jax.process_index() == 0


def any_process(flag: int) -> int:
    """The largest of every process's `flag` (0: none raised it); the flag itself alone."""
    if jax.process_count() == 1:
        return flag
    return int(np.max(multihost_utils.process_allgather(np.int32(flag))))
