"""Run folders: ``<save_dir>/<name>/<mode>-<timestamp>/`` holding the resolved config, checkpoints, q_v and logs."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from utils.distributed import Context, broadcast_object
from utils.io import atomic_write_text


def create_run_folder(save_dir: Path, name: str, mode: str, context: Context) -> Path:
    """A new, never-reused folder made by rank 0 and shared with every rank."""
    folder = None
    if context.is_main:
        stem = Path(save_dir) / name / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, n = stem, 1
        while True:
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                folder = stem.with_name(f"{stem.name}-{n}")
    return Path(broadcast_object(str(folder) if folder else None, context))


def write_config(folder: Path, config: dict) -> None:
    """The resolved config of the run, as JSON."""
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def get_logger(folder: Path, context: Context, name: str) -> logging.Logger:
    """Logger to the console and ``<folder>/<name>.log`` on rank 0; warnings only on the other ranks."""
    logger = logging.getLogger(f"learnsim.{name}.{folder}")
    logger.propagate = False
    if not logger.handlers:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if context.is_main:
            handlers.append(logging.FileHandler(folder / f"{name}.log"))
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    logger.setLevel(logging.INFO if context.is_main else logging.WARNING)
    return logger
