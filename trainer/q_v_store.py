"""Per-pair q_v state on disk, one file per pair and epoch, so a resumed run finds the state of its checkpoint.

A state written in epoch e is ``<pair>.epoch<e>.pt``. Every epoch visits every pair, so epoch e starts each pair
from its file of epoch e - 1, and from nothing else: a file of epoch e left by a killed run belongs to other
weights, and one of epoch e - 2 is a generation behind. A missing or unreadable state is an error that names the
file, since starting that pair afresh would silently break the exactness of a resumed run. Writing epoch e
removes files older than e - 1, so the two newest generations (the one a checkpoint refers to and the one being
written) are always kept.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from model.variational import Q_V_KEYS
from utils.io import atomic_torch_save, name_problem, torch_load_problem

_NAME = re.compile(r"^(?P<pair>.+)\.epoch(?P<epoch>\d+)\.pt$")
RESET_HINT = "resume with --reset-q-v to start q_v afresh on purpose"


class QVStateError(ValueError):
    """A q_v state that a resumed run needs but cannot use: missing, corrupt, or of another shape."""


class QVStore:
    """Folder of per-pair q_v states (created with the first state written)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, pair_id: str, epoch: int) -> Path:
        """File of the state of ``pair_id`` after ``epoch``; the pair ID must be a plain file name."""
        problem = name_problem(pair_id)
        if problem:
            raise QVStateError(f"pair ID {pair_id!r} {problem}")
        return self.folder / f"{pair_id}.epoch{epoch}.pt"

    def load(self, pair_id: str, epoch: int, velocity_shape: tuple[int, ...],
             mmap: bool = False) -> dict[str, torch.Tensor] | None:
        """State of ``pair_id`` at the start of ``epoch``: its file of epoch - 1 (None in epoch 1).

        ``mmap`` maps the file instead of reading it, enough to check its structure and shapes cheaply.
        """
        if epoch <= 1:
            return None
        path = self.path(pair_id, epoch - 1)
        if not path.is_file():
            raise QVStateError(f"{path}: q_v state of pair {pair_id} after epoch {epoch - 1} is missing, so the run "
                               f"cannot resume exactly; {RESET_HINT}")
        if not zipfile.is_zipfile(path):  # what torch.save writes; checked first, as mmap's error would mislead
            raise QVStateError(f"{path}: corrupt q_v state (not a torch zip archive); {RESET_HINT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # torch raises many types for a damaged file
            raise QVStateError(f"{path}: corrupt q_v state ({torch_load_problem(error)}); {RESET_HINT}") from None
        expected = (3, *velocity_shape)
        for key in Q_V_KEYS:
            if not isinstance(state, dict) or not isinstance(state.get(key), torch.Tensor):
                raise QVStateError(f"{path}: q_v state has no tensor {key!r}; {RESET_HINT}")
            if tuple(state[key].shape) != expected:
                raise QVStateError(f"{path}: q_v state {key} has shape {tuple(state[key].shape)}, the configured "
                                   f"transformation needs {expected}; was the run started with other dims or cps?")
        return {key: state[key] for key in Q_V_KEYS}

    def check(self, pair_ids: Iterable[str], epoch: int, velocity_shape: tuple[int, ...]) -> None:
        """Fail now, naming the file, unless every pair has a usable state for ``epoch`` (before writing anything)."""
        for pair_id in dict.fromkeys(pair_ids):
            self.load(pair_id, epoch, velocity_shape, mmap=True)

    def save(self, pair_id: str, epoch: int, state: dict[str, torch.Tensor]) -> None:
        """Write the state of ``pair_id`` after ``epoch`` atomically, and drop generations older than epoch - 1."""
        atomic_torch_save({"pair_id": pair_id, "epoch": epoch, **state}, self.path(pair_id, epoch))
        for old_epoch, path in self._files(pair_id).items():
            if old_epoch < epoch - 1:
                path.unlink(missing_ok=True)

    def _files(self, pair_id: str) -> dict[int, Path]:
        found = {}
        for path in self.folder.glob(f"{glob_escape(pair_id)}.epoch*.pt"):
            match = _NAME.match(path.name)
            if match and match["pair"] == pair_id:
                found[int(match["epoch"])] = path
        return found


def glob_escape(text: str) -> str:
    """Escape glob metacharacters in a pair ID."""
    return re.sub(r"([*?\[])", r"[\1]", text)
