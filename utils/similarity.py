"""Voxelwise similarity maps z and the data terms built from them (SSD and LCC of METHOD.md)."""
from __future__ import annotations

import torch

from utils.sobolev import separable_filter

LCC_EPS = 1e-5  # added to var_F * var_M in the denominator, as in the reference


def ssd_map(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """z = (F - M o phi)^2, voxelwise; inputs (B, C, D, H, W)."""
    return (fixed - warped) ** 2


def lcc_map(fixed: torch.Tensor, warped: torch.Tensor, s: int = 1) -> torch.Tensor:
    """Local squared normalised cross-correlation in a (2s+1)^3 box, replicate padding: cross^2 / (var_F var_M + eps)."""
    ones = torch.ones(2 * s + 1, dtype=fixed.dtype, device=fixed.device)
    window = float((2 * s + 1) ** 3)
    sums = separable_filter(torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], 1)
                            .reshape(fixed.shape[0], -1, *fixed.shape[2:]), ones)
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
