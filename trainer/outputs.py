"""Per-pair output files of test.py, written on the input grid of the fixed image with its affine.

Volumes are computed on the working grid (config ``dims``) and resampled to the fixed image's input grid by
data_loader.geometry (linear for intensities and fields, nearest for labels). The file names and their units
are listed in docs/outputs.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_loader.geometry import displacement_to_input_world, resample_to_input
from utils.io import save_nifti
from utils.itk import write_itk_displacement

PAIRS_FOLDER = "pairs"
WARPED_IM = "warped_im.nii.gz"
WARPED_SEG = "warped_seg.nii.gz"
DISPLACEMENT = "displacement.nii.gz"
ITK_DISPLACEMENT = "displacement_itk.nii.gz"  # the same transformation for ITK, SimpleITK and ANTs (LPS)
DISPLACEMENT_STD = "displacement_std.nii.gz"
DET_JACOBIAN = "det_jacobian.nii.gz"
SAMPLES_FOLDER = "samples"
PANEL = "panel.png"


def sample_name(kind: str, k: int) -> str:
    """File name of sample k of ``kind`` ('warped_im' or 'warped_seg') inside the samples folder."""
    return f"{kind}_{k:03d}.nii.gz"


@dataclass(frozen=True)
class PairGeometry:
    """Grids of a pair's fixed image: the working grid (``dims``, ``affine``) and the input grid it came from."""

    affine: np.ndarray
    input_affine: np.ndarray
    input_shape: tuple[int, int, int]
    dims: tuple[int, int, int]

    @classmethod
    def from_batch(cls, batch: dict, i: int) -> "PairGeometry":
        """Geometry of pair i of a collated batch of data_loader.dataset.PairDataset."""
        return cls(affine=batch["affine"][i].numpy().astype(np.float64),
                   input_affine=batch["input_affine"][i].numpy().astype(np.float64),
                   input_shape=tuple(int(n) for n in batch["input_shape"][i]),
                   dims=tuple(int(n) for n in batch["fixed"]["im"].shape[-3:]))


class PairWriter:
    """Writes the NIfTI files of one pair into ``folder`` on the fixed image's input grid."""

    def __init__(self, folder: Path, geometry: PairGeometry):
        self.folder, self.geometry = Path(folder), geometry

    def _to_numpy(self, volume) -> np.ndarray:
        return volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)

    def scalar(self, name: str, volume, mode: str, dtype=np.float32) -> Path:
        """A working-grid volume (D, H, W), resampled to the input grid with ``mode`` ('linear' or 'nearest')."""
        g = self.geometry
        array = resample_to_input(self._to_numpy(volume), g.input_shape, g.dims, mode)
        path = self.folder / name
        save_nifti(path, array, g.input_affine, dtype=dtype)
        return path

    def labels(self, name: str, seg) -> Path:
        """A working-grid label volume (D, H, W), nearest-neighbour resampled, stored as int32."""
        return self.scalar(name, self._to_numpy(seg).astype(np.int64), "nearest", dtype=np.int32)

    def _world(self, displacement) -> np.ndarray:
        """Working-grid displacement (3, D, H, W), working voxels -> input grid (3, X, Y, Z), mm, RAS world axes."""
        g = self.geometry
        return displacement_to_input_world(self._to_numpy(displacement).astype(np.float64), g.input_affine,
                                           g.input_shape, g.dims)

    def displacement(self, name: str, displacement) -> Path:
        """Working-grid displacement (3, D, H, W), working voxels -> vector image (X, Y, Z, 1, 3), mm, world axes."""
        path = self.folder / name
        save_nifti(path, np.moveaxis(self._world(displacement), 0, -1), self.geometry.input_affine, dtype=np.float32)
        return path

    def itk_displacement(self, name: str, displacement) -> Path:
        """Working-grid displacement (3, D, H, W) -> ITK displacement field on the input grid (LPS mm, utils.itk)."""
        return write_itk_displacement(self.folder / name, self._world(displacement), self.geometry.input_affine)
