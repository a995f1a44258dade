"""Cubic B-spline velocity fields on a control-point grid (the SVFFD transformation model)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def control_grid_shape(dims: Sequence[int], cps: Sequence[int]) -> tuple[int, ...]:
    """Control points per axis: enough to cover n voxels at spacing c, plus one on each side."""
    return tuple(math.ceil((n - 1) / c) + 1 + 2 for n, c in zip(dims, cps))


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The uniform cubic B-spline basis function B(t), support (-2, 2)."""
    t = t.abs()
    inner = 2.0 / 3.0 - t ** 2 + t ** 3 / 2.0
    outer = (2.0 - t).clamp(min=0.0) ** 3 / 6.0
    return torch.where(t < 1.0, inner, outer)


def bspline_kernel(stride: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """B((k - (2s - 1)) / s) for k = 0 .. 4s - 2: the basis sampled at the voxels between control points."""
    offsets = torch.arange(4 * stride - 1, dtype=dtype, device=device) - (2 * stride - 1)
    return cubic_bspline(offsets / stride)


def bspline_velocity(control: torch.Tensor, dims: Sequence[int], cps: Sequence[int]) -> torch.Tensor:
    """Dense velocity (B, C, *dims) from control-point values (B, C, *control_grid_shape(dims, cps)).

    Control point i of an axis sits at voxel (i - 1) * c. The tensor product is evaluated as three
    separable transposed convolutions with stride c, then cropped to the image.
    """
    channels = control.shape[1]
    out = control
    for axis, (n, c) in enumerate(zip(dims, cps)):
        kernel = bspline_kernel(c, control.dtype, control.device)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        stride, padding = [1, 1, 1], [0, 0, 0]
        stride[axis], padding[axis] = c, 2 * c - 1
        weight = kernel.view(shape).expand(channels, *shape[1:])
        out = F.conv_transpose3d(out, weight, stride=stride,
                                 padding=padding, groups=channels)
        out = out.narrow(2 + axis, c, n)
    return out
