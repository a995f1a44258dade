"""Sobolev preconditioning of velocity samples: smoothing in the forward pass, identity in the backward pass."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import native


def sobolev_kernel(s: int = 3, lambda_: float = 0.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Middle column of (I - lambda L)^-1 for the 1D Laplacian L of size 2s + 1, normalised to sum 1."""
    size = 2 * s + 1
    laplacian = (torch.diag(torch.full((size - 1,), 1.0, dtype=torch.float64), 1)
                 + torch.diag(torch.full((size - 1,), 1.0, dtype=torch.float64), -1)
                 - 2.0 * torch.eye(size, dtype=torch.float64))
    column = torch.linalg.solve(torch.eye(size, dtype=torch.float64) - lambda_ * laplacian,
                                torch.eye(size, dtype=torch.float64)[:, s])
    return (column / column.sum()).to(dtype=dtype, device=device)


def separable_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter every channel of x (B, C, D, H, W) with the 1D kernel along each spatial axis, replicate padding.

    The kernel (odd length) is correlated, not flipped. On the CPU the native kernel of ``utils.native`` does
    it; elsewhere each axis is a weighted sum of shifted views of the padded tensor, cheaper than a depthwise 3D
    convolution with a 1D kernel.
    """
    radius = (kernel.numel() - 1) // 2
    kernel = kernel.to(dtype=x.dtype, device=x.device)
    if native.usable(x, kernel):
        return _native_filter(x.contiguous(), kernel.contiguous())
    for axis in range(2, 5):
        x = _filter_axis(x, kernel, axis, radius)
    return x


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    size = x.shape[axis]
    pad = [0] * 6
    pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = radius  # F.pad lists the last axis first
    padded = F.pad(x, pad, mode="replicate")
    out = padded.narrow(axis, 0, size) * kernel[0]
    for tap in range(1, kernel.numel()):
        out.addcmul_(padded.narrow(axis, tap, size), kernel[tap])
    return out


def _native_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The three axes through native.separable_filter_axis: x -> a -> b -> out, each (outer, n, inner)."""
    batch, channels, *shape = x.shape
    first, second, out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    sources, targets = (x, first, second), (first, second, out)
    for axis, (source, target) in enumerate(zip(sources, targets)):
        outer, inner = batch * channels * math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        native.call("separable_filter_axis", x.dtype, source.data_ptr(), target.data_ptr(), outer, shape[axis], inner,
                    kernel.data_ptr(), kernel.numel())
    return out


class _SobolevGradient(torch.autograd.Function):
    """Forward: Sobolev smoothing. Backward: identity, so it preconditions the gradient of q_v's parameters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return separable_filter(x, kernel.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def sobolev_precondition(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Smoothed x (B, C, D, H, W) whose gradient passes straight through to x."""
    return _SobolevGradient.apply(x, kernel)
