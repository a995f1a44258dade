"""Image pyramids for coarse-to-fine q_v inference: level grids, anti-aliased downsampling, and velocity fields moved
between levels.

A level of factor f of a grid of n voxels per axis has round((n - 1) / f) + 1 voxels, with the corner voxels of
both grids at the same place (align_corners=True, utils.grid): one coarse voxel is (n - 1) / (n_f - 1) fine voxels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from utils.grid import ALIGN_CORNERS
from utils.sobolev import separable_filter

MIN_LEVEL_SIZE = 8  # coarser levels than this many voxels along any axis are skipped


def level_shape(dims: Sequence[int], factor: int) -> tuple[int, int, int]:
    """Grid (3 sizes) of the pyramid level ``factor`` (1: ``dims`` itself) of a grid ``dims``."""
    return tuple(max(2, round((int(n) - 1) / factor) + 1) for n in dims)


def level_shapes(dims: Sequence[int], factors: Sequence[int]) -> list[tuple[int, int, int]]:
    """The grids of the levels ``factors`` (coarse to fine), without levels smaller than MIN_LEVEL_SIZE along an
    axis (the finest level is always kept) and without repeats."""
    shapes = []
    for i, factor in enumerate(factors):
        shape = level_shape(dims, factor)
        if (min(shape) >= MIN_LEVEL_SIZE or i == len(factors) - 1) and shape not in shapes:
            shapes.append(shape)
    return shapes


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` voxels, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def downsample_image(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Image (B, C, D, H, W) on a coarser grid ``shape``: Gaussian blur of sigma half the size ratio (anti-aliasing,
    replicate padding), then trilinear sampling. Returned unchanged when the shape is already ``shape``."""
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    ratio = max((n - 1) / (m - 1) for n, m in zip(image.shape[2:], shape))
    if ratio > 1.0:
        image = separable_filter(image, gaussian_kernel(0.5 * ratio, image.dtype, image.device))
    return F.interpolate(image, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)


def downsample_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Mask (B, 1, D, H, W) of 0/1 on the grid ``shape``: 1 where the trilinearly sampled mask is at least 0.5."""
    if tuple(mask.shape[2:]) == tuple(shape):
        return mask
    resized = F.interpolate(mask.float(), size=tuple(int(n) for n in shape), mode="trilinear",
                            align_corners=ALIGN_CORNERS)
    return (resized >= 0.5).to(mask.dtype)


def voxel_ratio(source: Sequence[int], target: Sequence[int]) -> tuple[float, float, float]:
    """Target voxels per source voxel along each axis (align_corners=True grids over the same field of view)."""
    return tuple((int(t) - 1) / (int(s) - 1) for s, t in zip(source, target))


def resize_velocity(velocity: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Velocity (B, 3, ...) in voxel units of its grid -> the grid ``shape``, voxel units of that grid.

    Trilinear (align_corners=True), and component k multiplied by the voxels of the new grid per voxel of the old
    one along axis k, so that the field describes the same motion in world space.
    """
    ratio = voxel_ratio(velocity.shape[2:], shape)
    resized = F.interpolate(velocity, size=tuple(int(n) for n in shape), mode="trilinear",
                            align_corners=ALIGN_CORNERS)
    return resized * torch.tensor(ratio, dtype=velocity.dtype, device=velocity.device).view(1, 3, 1, 1, 1)
