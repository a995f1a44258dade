"""The one grid convention of the project.

Images are tensors (B, C, D, H, W) whose spatial axes are the NIfTI array axes 0, 1, 2. Velocities and
displacements are (B, 3, D, H, W) with channel k along array axis k, in voxel units unless a name says
otherwise. ``torch.nn.functional.grid_sample`` wants normalised coordinates in [-1, 1] with the last grid
dimension ordered (W, H, D); with ``align_corners=True`` voxel i of an axis of n voxels sits at
2 i / (n - 1) - 1, so one voxel is 2 / (n - 1) normalised units.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

ALIGN_CORNERS = True  # voxel centres at -1 and +1: one voxel is 2 / (n - 1) normalised units


def voxel_to_normalised(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Factors (1, 3, 1, 1, 1) that turn a voxel-unit displacement into normalised units, per array axis.

    Cached per (shape, device, dtype) like ``identity_grid``: a shared tensor, never to be modified in place.
    """
    return _voxel_to_normalised(_shape_key(shape), _device_key(device), dtype)


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity sampling grid (1, D, H, W, 3) in normalised coordinates, last axis ordered (W, H, D).

    Cached per (shape, device, dtype), since every warp and every squaring needs it: the tensor is shared,
    so use it only in out-of-place operations.
    """
    return _identity_grid(_shape_key(shape), _device_key(device), dtype)


def _shape_key(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)


def _device_key(device) -> torch.device:
    """A device with its index, so that 'cuda' means the current CUDA device at the time of the call."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# Built outside inference mode and without autograd history, so that the cached tensors can be used anywhere.
@functools.lru_cache(maxsize=16)
def _voxel_to_normalised(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    factors = [2.0 / (n - 1) if n > 1 else 0.0 for n in shape]
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(factors, device=device, dtype=dtype).view(1, 3, 1, 1, 1)


@functools.lru_cache(maxsize=8)
def _identity_grid(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack(mesh[::-1], dim=-1).unsqueeze(0)


def to_grid_order(field: torch.Tensor) -> torch.Tensor:
    """(B, 3, D, H, W) in array-axis order -> (B, D, H, W, 3) in grid_sample order (W, H, D)."""
    return field.flip(1).permute(0, 2, 3, 4, 1)
