"""What train.py and test.py share on the command line: common flags and clean error exits."""
from __future__ import annotations

import argparse
import errno
import re
import signal
import sys
import traceback
from typing import Callable

import torch

from trainer.checkpoint import CheckpointError
from trainer.q_v_store import QVStateError
from utils.config import ConfigError

# errors that bad input, a bad file or a full disk cause: reported in one line (the traceback with --debug)
USER_ERRORS = (ConfigError, CheckpointError, QVStateError, OSError, ValueError)
MEMORY_HINT = "lower data_loader.args.dims, data_loader.args.batch_size or model.args.no_features"


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is a failed allocation: Python's or numpy's MemoryError, torch's CPU allocator (a plain
    RuntimeError) or CUDA's OutOfMemoryError."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --set overrides, --debug, and the legacy launcher's --local_rank / --local-rank."""
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config key, value parsed as JSON, e.g. --set trainer.no_epochs=2 "
                             "(repeatable)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def error_message(error: BaseException) -> str:
    """One line saying what went wrong and where (the file or config key the error names)."""
    if isinstance(error, OSError) and error.errno is not None:
        reason = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error)).lower()
        where = error.filename or ""
        return f"{reason}: {where}" if where else reason
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if out_of_memory(error):
        size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGTPE]?i?B)", str(error))
        tried = f" (tried to allocate {size[1] + ' bytes' if size[1] else size[2]})" if size else ""
        return f"out of memory{tried}: {MEMORY_HINT}"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanup (``finally``) runs as for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an entry point; bad input ends it with a one-line message (exit status 1) instead of a traceback, and
    Ctrl-C or SIGTERM with one line (exit status 130 or 143) after the entry point has cleaned up."""
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except (*USER_ERRORS, MemoryError, RuntimeError) as error:
        if not isinstance(error, USER_ERRORS) and not out_of_memory(error):
            raise
        if "--debug" in argv:
            traceback.print_exc()
        sys.exit(f"error: {error_message(error)}")
    except KeyboardInterrupt as error:
        if "--debug" in argv:
            traceback.print_exc()
        terminated = isinstance(error, Terminated)
        sys.stderr.write(f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}\n")
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)
