"""Voxelwise similarity maps z and the data terms built from them (SSD and LCC of METHOD.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LCC_EPS = 1e-5  # added to var_F * var_M in the denominator, as in the reference
LCC_FORMS = ("reference", "textbook")  # see lcc_map and lcc_map_textbook


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


def window_sum(x: torch.Tensor, s: int = 1, window: torch.Tensor | None = None) -> torch.Tensor:
    """K(x): the (2s+1)^3 window correlation of every channel of x (B, C, D, H, W), replicate padding.

    ``window`` None is the fixed box of ones (separable, ``box_sum``); otherwise a (1, 1, 2s+1, 2s+1, 2s+1)
    weight (the learnt LCC's window, an nn.Conv3d(1, 1, 2s+1, bias=False) weight in the reference) applied to
    each channel alone, as a depthwise convolution.
    """
    if window is None:
        return box_sum(x, s)
    channels = x.shape[1]
    return F.conv3d(F.pad(x, [s] * 6, mode="replicate"), window.expand(channels, 1, -1, -1, -1), groups=channels)


def lcc_map(fixed: torch.Tensor, warped: torch.Tensor, s: int = 1, window: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's local squared normalised cross-correlation, voxelwise (B, 1, D, H, W).

    With K = ``window_sum`` and n = (2s+1)^3: mu_F = K(F) / n, mu_M = K(M) / n, then
    cross = K((F - mu_F)(M - mu_M)), var_F = K((F - mu_F)^2), var_M = K((M - mu_M)^2),
    z = cross^2 / (var_F var_M + eps).
    A quirk kept for fidelity: each voxel of a window enters with its deviation from ITS OWN local mean, not from
    the mean of the centre voxel's window (that is ``lcc_map_textbook``). n stays (2s+1)^3 when the window is
    learnt, as in the reference (it divides by the window size, not by the sum of the weights).
    """
    n = float((2 * s + 1) ** 3)
    images = torch.cat([fixed, warped], 1)
    deviation_f, deviation_w = (images - window_sum(images, s, window) / n).chunk(2, dim=1)
    sums = window_sum(torch.cat([deviation_f * deviation_w, deviation_f * deviation_f, deviation_w * deviation_w], 1),
                      s, window)
    cross, var_f, var_w = sums.chunk(3, dim=1)
    return cross * cross / (var_f * var_w + LCC_EPS)


def lcc_map_textbook(fixed: torch.Tensor, warped: torch.Tensor, s: int = 1,
                     window: torch.Tensor | None = None) -> torch.Tensor:
    """Window-centred local squared NCC (not the reference's form): every voxel of the window minus the window mean.

    cross = K(FM) - K(F) K(M) / n, var_F = K(F^2) - K(F)^2 / n, var_M likewise; z = cross^2 / (var_F var_M + eps).
    """
    n = float((2 * s + 1) ** 3)
    sums = window_sum(torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], 1), s, window)
    f_sum, w_sum, ff_sum, ww_sum, fw_sum = sums.chunk(5, dim=1)
    cross = fw_sum - f_sum * w_sum / n
    var_f = ff_sum - f_sum * f_sum / n
    var_w = ww_sum - w_sum * w_sum / n
    return cross * cross / (var_f * var_w + LCC_EPS)


def ssd_data_term(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of z inside the fixed mask, per pair (B,)."""
    return 0.5 * (z * mask).flatten(1).sum(1)


def lcc_data_term(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-sum of z inside the fixed mask, per pair (B,)."""
    return -(z * mask).flatten(1).sum(1)
