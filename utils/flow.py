"""Warping and scaling-and-squaring integration of stationary velocity fields (conventions: utils.grid).

On the CPU, trilinear sampling with border padding goes through the native kernel of ``utils.trilinear``
(the same sampling as ``grid_sample``, several times faster); elsewhere, and where that kernel is not
available, through ``torch.nn.functional.grid_sample``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils import trilinear
from utils.grid import ALIGN_CORNERS, identity_grid, to_grid_order, voxel_to_normalised

NO_SQUARINGS = 12  # the reference integrates v / 2^12 with 12 squarings


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at x + displacement(x); displacement (B, 3, D, H, W), voxel units.

    ``mode='bilinear'`` is trilinear in 3D; use ``'nearest'`` for masks and label maps.
    """
    if (mode == "bilinear" and padding_mode == "border" and image.shape[0] == displacement.shape[0]
            and image.shape[2:] == displacement.shape[2:]
            and not (image.requires_grad and torch.is_grad_enabled())
            and trilinear.usable(image.to(displacement.dtype), displacement)):
        return trilinear.warp_border(image.to(displacement.dtype), displacement)
    shape = displacement.shape[2:]
    scale = voxel_to_normalised(shape, displacement.device, displacement.dtype)
    grid = torch.addcmul(identity_grid(shape, displacement.device, displacement.dtype),
                         to_grid_order(displacement), to_grid_order(scale))
    if mode == "nearest" and not image.is_floating_point():
        sampled = F.grid_sample(image.to(displacement.dtype), grid, mode="nearest",
                                padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
        return sampled.round().to(image.dtype)
    return F.grid_sample(image.to(displacement.dtype), grid, mode=mode, padding_mode=padding_mode,
                         align_corners=ALIGN_CORNERS)


def integrate_velocity(velocity: torch.Tensor, no_squarings: int = NO_SQUARINGS,
                       padding_mode: str = "border") -> torch.Tensor:
    """Displacement u of phi = exp(v) by scaling and squaring; velocity and result (B, 3, D, H, W), voxel units.

    As in the reference: u0 = v / 2^N in normalised units, then N times u <- u + u o (id + u), each
    composition a trilinear sample with border padding (VoxelMorph pads with zeros: ``padding_mode='zeros'``).
    """
    if no_squarings >= 1 and padding_mode == "border" and trilinear.usable(velocity):
        return trilinear.scaling_and_squaring(velocity, no_squarings)
    shape = velocity.shape[2:]
    scale = voxel_to_normalised(shape, velocity.device, velocity.dtype)
    grid = identity_grid(shape, velocity.device, velocity.dtype)
    # normalised, channels in grid order (W, H, D); dividing by 2^N is exact, so the order of the factors is free
    u = velocity.flip(1) * (scale / 2 ** no_squarings).flip(1)
    for _ in range(no_squarings):
        u = u + F.grid_sample(u, grid + u.permute(0, 2, 3, 4, 1), mode="bilinear",
                              padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    return u.flip(1) / scale
