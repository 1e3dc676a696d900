"""One run over several processes (one per host, or several on one host for tests): JAX's
multi-controller runtime. Every process runs the same program on its own devices; process 0
alone writes the console, the logs and the lock; all take part in checkpoints.

Joining is where a multi-process run goes wrong: a peer that never comes, a coordinator port
another program holds, processes started with different settings. Each ends in one line and
exit code 2 here, before anything is written: a watchdog bounds the join and the agreement
(JAX's own timeout aborts the process), and the processes compare fingerprints once joined.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..config.ranges import COUNT, COUNT0, flag
from ..core.compat import persistent_cache_unsafe
from ..core.errors import UserError, print_err


class DisagreementError(UserError):
    """Processes of one run started with different configs, corpora or run directories."""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address; starts one process of a run")
    g.add_argument("--num-processes", type=flag(COUNT), help="processes in the run (with --coordinator)")
    g.add_argument(
        "--process-id", type=flag(COUNT0), help="this process's rank, 0..num-processes-1 (with --coordinator)"
    )
    g.add_argument(
        "--distributed", action="store_true", help="let JAX detect the cluster (SLURM, Open MPI) and initialise from it"
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=flag(COUNT),
        default=60,
        metavar="S",
        help="seconds after which the others stop when a process is gone (default 60)",
    )
    g.add_argument(
        "--join-timeout",
        type=flag(COUNT),
        default=300,
        metavar="S",
        help="seconds a process waits for all the others to join and agree before it gives up (default 300)",
    )


class JoinWatchdog:
    """Bounds the wait for the other processes: says whom it waits for after a few seconds, and
    ends the process with one line and exit code 2 when `timeout` passes."""

    NOTICE_S = 5.0

    def __init__(self, timeout: int, who: str, waits_for: str):
        self.timeout, self.who, self.waits_for = timeout, who, waits_for
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="join-watchdog", daemon=True).start()

    def _watch(self) -> None:
        if self.done.wait(min(self.NOTICE_S, self.timeout / 2)):
            return
        print_err(f"{self.who}: waiting for {self.waits_for} (gives up after {self.timeout} s: --join-timeout)")
        if self.done.wait(self.timeout - min(self.NOTICE_S, self.timeout / 2)):
            return
        print_err(
            f"error: {self.who}: gave up after {self.timeout} s waiting for {self.waits_for}; start every process "
            "of the run with the same --coordinator and --num-processes, or raise --join-timeout"
        )
        sys.stderr.flush()
        os._exit(2)  # the main thread is blocked inside JAX's runtime; nothing has been written yet

    def stop(self) -> None:
        self.done.set()


def check_port_free(address: str) -> None:
    """Process 0 serves the coordinator on this port: a port already held is one line here, not
    a crash inside the runtime."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator {address!r}: expected HOST:PORT with a port in [1, 65535]")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the runtime's server does
        try:
            s.bind(("0.0.0.0", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"--coordinator {address}: port {port} is in use on this host (another run's "
                    "coordinator?); choose a free port"
                ) from None
            raise UserError(f"--coordinator {address}: cannot serve on port {port} ({e.strerror})") from None


def initialize(args: argparse.Namespace) -> JoinWatchdog | None:
    """Join the run before anything touches a device; no-op for a single-process run. Returns the
    watchdog, still running: the caller stops it once the processes agree (`agree`)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in explicit):
        return None
    if not args.distributed and any(x is None for x in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together (or use --distributed)")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id {args.process_id}: must be within [0, --num-processes {args.num_processes})")
    if args.distributed:
        who, waits_for = "this process", "the cluster's other processes to join"
    else:
        who = f"process {args.process_id} of {args.num_processes}"
        waits_for = (
            f"the other {args.num_processes - 1} process(es) to join at {args.coordinator}"
            if args.process_id == 0
            else f"process 0's coordinator at {args.coordinator} and the others to join"
        )
        if args.process_id == 0:
            check_port_free(args.coordinator)
    watchdog = JoinWatchdog(args.join_timeout, who, waits_for)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives of CPU devices across processes
    kwargs = (
        {}
        if args.distributed
        else {
            "coordinator_address": args.coordinator,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
    )
    jax.distributed.initialize(
        **kwargs, heartbeat_timeout_seconds=args.heartbeat_timeout, initialization_timeout=args.join_timeout + 60
    )  # ours fires first, in one line
    watchdog.waits_for = "the other processes to compare their settings"
    if why := persistent_cache_unsafe(jax.default_backend(), jax.process_count()):
        jax.config.update("jax_enable_compilation_cache", False)
        if jax.config.jax_compilation_cache_dir and is_primary():
            print(f"note: the persistent compilation cache is off for this run: {why}", file=sys.stderr)
    return watchdog


def agree(fingerprint: dict[str, str], watchdog: JoinWatchdog | None) -> None:
    """Every process compares its fingerprint (resolved config, corpus, run directory) with
    process 0's; the first difference stops all of them, naming the key and both values."""
    if jax.process_count() == 1:
        if watchdog:
            watchdog.stop()
        return
    blob = np.frombuffer(json.dumps(list(fingerprint.items())).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    if watchdog:
        watchdog.stop()
    read = lambda i: dict(json.loads(bytes(blobs[i, : lengths[i]]).decode("utf-8")))  # noqa: E731
    ref = read(0)
    for i in range(1, len(lengths)):
        other = read(i)
        for key in list(ref) + [k for k in other if k not in ref]:
            if ref.get(key) != other.get(key):
                raise DisagreementError(
                    f"the processes disagree: {key} is {other.get(key, '(absent)')} in process {i} and "
                    f"{ref.get(key, '(absent)')} in process 0; start every process with the same config, corpus and run directory"
                )


def is_primary() -> bool:
    return jax.process_index() == 0


def any_process(flag: int) -> int:
    """The largest of every process's `flag` (0: none raised it); the flag itself alone."""
    if jax.process_count() == 1:
        return flag
    return int(np.max(multihost_utils.process_allgather(np.int32(flag))))
