"""The regulariser on the velocity: squared forward differences, with the reference's far-edge padding."""
from __future__ import annotations

import torch


def squared_forward_differences(velocity: torch.Tensor) -> torch.Tensor:
    """Sum over voxels, components and axes of (v(x + e_k) - v(x))^2, per pair (B,); velocity (B, 3, D, H, W).

    A quirk kept for fidelity: the reference replicate-pads each difference array at the far edge so that it keeps
    the size of v, which counts the last difference along each axis twice.
    """
    total = velocity.new_zeros(velocity.shape[0])
    for axis in range(2, 5):
        if velocity.shape[axis] < 2:
            continue
        squared = velocity.diff(dim=axis) ** 2
        total = total + squared.flatten(1).sum(1) + squared.narrow(axis, -1, 1).flatten(1).sum(1)
    return total


def reg_term(velocity: torch.Tensor, w_reg: float) -> torch.Tensor:
    """0.5 * w_reg * squared forward differences of v, per pair (B,)."""
    return 0.5 * w_reg * squared_forward_differences(velocity)


def flow_gradient_l2(flow: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's ``Grad('l2')`` penalty of a flow (B, 3, D, H, W), per pair (B,).

    The mean over voxels and components of the squared forward differences along each axis (without padding, so
    each axis has one difference fewer than voxels), averaged over the three axes.
    """
    per_axis = [(flow.diff(dim=axis) ** 2).flatten(1).mean(1) for axis in range(2, 5)]
    return sum(per_axis) / 3.0
