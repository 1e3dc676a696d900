"""One way every command ends: a user mistake or an environment failure is one line and a
non-zero exit code; an internal error is one line plus a traceback file that names the bug."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path

from . import platforms
from .errors import UserError, print_err
from .writing import write_file

EXIT_ENVIRONMENT = 2  # a path that cannot be read or written, a full disk, a damaged database
EXIT_INTERNAL = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (`error: argument --seed: ...`) and exit code 2, like
    every other user mistake; `--help` still prints the usage."""

    def error(self, message: str) -> typing.NoReturn:
        print_err(f"error: {message} (see {self.prog} --help)")
        sys.exit(2)


def out_of_memory(e: BaseException) -> bool:
    """XLA's allocation failure (its RESOURCE_EXHAUSTED status) or the host's."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_os_error(e: OSError) -> str:
    """`path: reason` for an OSError, the form a user can act on."""
    where = e.filename if e.filename is not None else ""
    reason = e.strerror or first_line(e)
    return f"{where}: {reason}" if where else reason


def write_traceback(e: BaseException, directory: Path | None, prog: str) -> Path | None:
    """Write the full traceback to `directory` (a temporary directory if it cannot be written);
    returns the file, or None if nothing could be written anywhere."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    name = f"{prog.replace('.', '_')}-traceback-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    for d in ([directory] if directory is not None else []) + [Path(tempfile.gettempdir())]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            return write_file(d / name, f"{' '.join(sys.argv)}\n\n{text}")
        except OSError:
            continue
    return None


def run_cli(
    prog: str, body: Callable[[], int], traceback_dir: Callable[[], Path | None] = lambda: None, devices: bool = True
) -> int:
    """Run a command's body and turn any exception into one line and an exit code. `devices`: start
    the accelerator first (a command that joins a multi-process run does it after joining)."""
    try:
        if devices:
            platforms.require()
        return body()
    except UserError as e:
        print_err(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print_err("interrupted")
        return 130
    except OSError as e:
        print_err(f"error: {describe_os_error(e)}")
        return EXIT_ENVIRONMENT
    except sqlite3.DatabaseError as e:
        print_err(f"error: metrics database: {first_line(e)}")
        return EXIT_ENVIRONMENT
    except MemoryError:
        print_err("error: out of memory (ask for less: fewer tokens, a smaller batch)")
        return EXIT_ENVIRONMENT
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        if out_of_memory(e):  # an allocation the estimates (model/memory.py) let through
            print_err(
                f"error: out of memory on the device ({first_line(e)}); ask for less: a smaller batch, model "
                "or --num-samples"
            )
            return EXIT_ENVIRONMENT
        path = write_traceback(e, traceback_dir(), prog)
        where = f"; traceback in {path}" if path else ""
        print_err(f"error: {prog} failed: {type(e).__name__}: {first_line(e)}{where}")
        return EXIT_INTERNAL
