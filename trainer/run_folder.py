"""Run folders: ``<save_dir>/<name>/<mode>-<timestamp>/`` with the resolved config, status, checkpoints, q_v, logs.

A folder is created only once its run has been checked and can start. ``status.json`` says what became of the
run: ``running`` (also what a killed run leaves), ``failed`` with the error message, or ``finished``. One process
works in a run folder at a time: it holds ``run.lock`` for the life of the run (``utils.io.exclusive_lock``).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Iterator

from trainer.checkpoint import CheckpointError
from trainer.cli import error_message
from utils.distributed import Context, barrier, broadcast_object
from utils.io import TMP_PREFIX, atomic_write_text, exclusive_lock

STATUS_FILE = "status.json"
LOCK_FILE = "run.lock"
_CHECKPOINT_NAME = re.compile(r"checkpoint_epoch\d+\.pt")


def new_run_folder(save_dir: Path, name: str, mode: str, context: Context) -> Path:
    """The path of a new run folder, decided by rank 0 and shared with every rank; ``started_run`` creates it."""
    folder = None
    if context.is_main:
        stem = Path(save_dir) / name / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, n = stem, 1
        while folder.exists():
            n += 1
            folder = stem.with_name(f"{stem.name}-{n}")
    return Path(broadcast_object(str(folder) if folder else None, context))


def create_run_folder(save_dir: Path, name: str, mode: str, context: Context) -> Path:
    """A new folder made at once by rank 0 (for callers that have checked their run themselves)."""
    folder = new_run_folder(save_dir, name, mode, context)
    if context.is_main:
        folder.mkdir(parents=True)
    barrier(context)
    return folder


def resumed_run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a training checkpoint, which must sit where its run put it:
    ``<run>/checkpoints/checkpoint_epoch<E>.pt`` beside ``<run>/config.json``."""
    path = Path(checkpoint).resolve()
    folder = path.parent.parent
    if (path.parent.name != "checkpoints" or not _CHECKPOINT_NAME.fullmatch(path.name)
            or not (folder / "config.json").is_file()):
        raise CheckpointError(f"{checkpoint}: not in the layout of a run folder (<run>/checkpoints/"
                              f"checkpoint_epoch<E>.pt beside <run>/config.json); a run resumes in its own folder, "
                              f"so resume from the checkpoint where training wrote it")
    return folder


def write_config(folder: Path, config: dict) -> None:
    """The resolved config of the run, as JSON."""
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def write_status(folder: Path, status: str, message: str | None = None) -> None:
    """``status.json``: running, failed (with the message) or finished, and when."""
    record = {"status": status, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(folder / STATUS_FILE, json.dumps(record, indent=2) + "\n")


def read_status(folder: Path) -> dict | None:
    """The content of ``status.json`` (None when there is none)."""
    path = Path(folder) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files (and folders) that a killed run left in ``folder``."""
    for path in sorted(Path(folder).rglob(f"{TMP_PREFIX}*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _open_run_folder(folder: Path, resumed: bool, lock: ExitStack) -> None:
    """Create the run folder (or reopen a resumed one) and take its lock into ``lock``; a resumed run then removes
    what a killed run left."""
    if not resumed:
        Path(folder).parent.mkdir(parents=True, exist_ok=True)
        try:
            Path(folder).mkdir()
        except FileExistsError:
            raise FileExistsError(f"run folder {folder} was made by another run meanwhile; start again") from None
    lock.enter_context(exclusive_lock(Path(folder) / LOCK_FILE, f"run folder {folder}"))
    if resumed:
        remove_stale_temporaries(folder)


@contextmanager
def started_run(folder: Path, config: dict, context: Context, resumed: bool = False) -> Iterator[Path]:
    """Create the run folder (or reopen a resumed one) and hold its lock, write config.json and status 'running';
    at the end of the block the status is 'finished', or 'failed' with the error's message (rank 0 writes).

    A run folder in which another process works (a second resume of a checkpoint, a resume of a running run) is
    refused, on every rank, with the holder's PID named."""
    with ExitStack() as lock:
        error = None
        if context.is_main:
            try:
                _open_run_folder(folder, resumed, lock)
            except (OSError, ValueError) as caught:
                error = caught
        problem = broadcast_object(error_message(error) if error is not None else None, context)
        if error is not None:
            raise error
        if problem is not None:
            raise ValueError(f"rank 0 cannot start the run: {problem}")
        try:
            if context.is_main:
                write_status(folder, "running")
                write_config(folder, config)
            barrier(context)
            yield Path(folder)
        except BaseException as failure:
            if context.is_main:
                with suppress(OSError):  # a full disk must not hide the error itself
                    write_status(folder, "failed", error_message(failure))
            raise
        if context.is_main:
            write_status(folder, "finished")


class _FileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) stop the run with the file named, instead of a printed traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror or str(error), self.baseFilename) from error
        super().handleError(record)


def get_logger(folder: Path, context: Context, name: str) -> logging.Logger:
    """Logger to the console and ``<folder>/<name>.log`` on rank 0; warnings only on the other ranks."""
    logger = logging.getLogger(f"learnsim.{name}.{folder}")
    logger.propagate = False
    if not logger.handlers:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if context.is_main:
            handlers.append(_FileHandler(folder / f"{name}.log"))
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    logger.setLevel(logging.INFO if context.is_main else logging.WARNING)
    return logger
