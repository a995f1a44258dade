"""Per-pair q_v state on disk, one file per pair and epoch, so a resumed run finds the state of its checkpoint.

A state written in epoch e is ``<pair>.epoch<e>.pt``. Loading for epoch e takes the newest file of an epoch
before e, so files left by a killed epoch are ignored; writing epoch e removes files older than e - 1, so the
two newest generations (the one a checkpoint refers to and the one being written) are always kept.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from model.variational import Q_V_KEYS
from utils.io import atomic_torch_save

_NAME = re.compile(r"^(?P<pair>.+)\.epoch(?P<epoch>\d+)\.pt$")


class QVStore:
    """Folder of per-pair q_v states."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _files(self, pair_id: str) -> dict[int, Path]:
        found = {}
        for path in self.folder.glob(f"{glob_escape(pair_id)}.epoch*.pt"):
            match = _NAME.match(path.name)
            if match and match["pair"] == pair_id:
                found[int(match["epoch"])] = path
        return found

    def load(self, pair_id: str, epoch: int, velocity_shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
        """State of ``pair_id`` as it was before ``epoch`` (None if the pair has none yet)."""
        earlier = {e: p for e, p in self._files(pair_id).items() if e < epoch}
        if not earlier:
            if epoch > 1 and self._files(pair_id):
                warnings.warn(f"q_v state of pair {pair_id} from before epoch {epoch} is gone (only the two newest "
                              f"epochs are kept); it starts again from the initial q_v")
            return None
        path = earlier[max(earlier)]
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = (3, *velocity_shape)
        for key in Q_V_KEYS:
            if key not in state or tuple(state[key].shape) != expected:
                raise ValueError(f"{path}: q_v state does not fit the configured transformation (expected {key} of "
                                 f"shape {expected}); was the run started with another dims or cps?")
        return {key: state[key] for key in Q_V_KEYS}

    def save(self, pair_id: str, epoch: int, state: dict[str, torch.Tensor]) -> None:
        """Write the state of ``pair_id`` after ``epoch`` atomically, and drop generations older than epoch - 1."""
        atomic_torch_save({"pair_id": pair_id, "epoch": epoch, **state}, self.folder / f"{pair_id}.epoch{epoch}.pt")
        for old_epoch, path in self._files(pair_id).items():
            if old_epoch < epoch - 1:
                path.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters in a pair ID."""
    return re.sub(r"([*?\[])", r"[\1]", text)
