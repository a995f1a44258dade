"""Sobolev preconditioning of velocity samples: smoothing in the forward pass, identity in the backward pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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

    The kernel (odd length) is correlated, not flipped. Each axis is a weighted sum of shifted views of the
    padded tensor, cheaper on CPU than a depthwise 3D convolution with a 1D kernel.
    """
    radius = (kernel.numel() - 1) // 2
    kernel = kernel.to(dtype=x.dtype, device=x.device)
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
