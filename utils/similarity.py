"""Voxelwise similarity maps z and the data terms built from them (SSD and LCC of METHOD.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LCC_EPS = 1e-5  # added to var_F * var_M in the denominator, as in the reference


def ssd_map(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """z = (F - M o phi)^2, voxelwise; inputs (B, C, D, H, W)."""
    return (fixed - warped) ** 2


def box_sum(x: torch.Tensor, s: int = 1) -> torch.Tensor:
    """Sum of x (B, C, D, H, W) over the (2s+1)^3 box around every voxel, replicate padding.

    Separable: along each axis, the sum of 2s+1 shifted views of the padded tensor (cheaper forward and
    backward than a depthwise convolution on CPU).
    """
    if s == 0:
        return x
    for axis in range(2, 5):
        size = x.shape[axis]
        pad = [0] * 6
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = s  # F.pad lists the last axis first
        padded = F.pad(x, pad, mode="replicate")
        total = padded.narrow(axis, 0, size) + padded.narrow(axis, 1, size)
        for shift in range(2, 2 * s + 1):
            total.add_(padded.narrow(axis, shift, size))
        x = total
    return x


def lcc_map(fixed: torch.Tensor, warped: torch.Tensor, s: int = 1) -> torch.Tensor:
    """Local squared normalised cross-correlation in a (2s+1)^3 box, replicate padding: cross^2 / (var_F var_M + eps)."""
    window = float((2 * s + 1) ** 3)
    sums = box_sum(torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], 1), s)
    f_sum, w_sum, ff_sum, ww_sum, fw_sum = sums.chunk(5, dim=1)
    cross = fw_sum - f_sum * w_sum / window
    var_f = ff_sum - f_sum * f_sum / window
    var_w = ww_sum - w_sum * w_sum / window
    return cross * cross / (var_f * var_w + LCC_EPS)


def ssd_data_term(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of z inside the fixed mask, per pair (B,)."""
    return 0.5 * (z * mask).flatten(1).sum(1)


def lcc_data_term(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-sum of z inside the fixed mask, per pair (B,)."""
    return -(z * mask).flatten(1).sum(1)
