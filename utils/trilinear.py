"""Fast trilinear sampling with border padding on the CPU: warping and fused scaling and squaring.

PyTorch's CPU kernel of 3D ``grid_sample`` is scalar code parallel over the batch only, and scaling and
squaring calls it 12 times per sample on a 3-channel field. ``trilinear.cpp`` does the same arithmetic
(``mode='bilinear'``, ``padding_mode='border'``, ``align_corners=True``, in voxel coordinates) over all
threads, vectorised along x, with the three components of a voxel side by side, and integrates all squarings
in one operator whose backward pass reuses the stored intermediate fields (half the memory autograd keeps for
12 ``grid_sample`` calls). How it is built, and the fallback to ``grid_sample``: ``utils.native``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from utils.native import call, usable

__all__ = ["scaling_and_squaring", "usable", "warp_border"]


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _integrate(velocity: torch.Tensor, no_squarings: int, keep_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The displacement, and the fields u_0 .. u_{N-1} (N, B, D, H, W, 3) when ``keep_history`` (else scratch)."""
    velocity = velocity.contiguous()
    batch, _, *shape = velocity.shape
    history = velocity.new_empty((no_squarings if keep_history else min(no_squarings, 2), batch, *shape, 3))
    out = torch.empty_like(velocity)
    call("svf_forward", velocity.dtype, _ptr(velocity), _ptr(history), _ptr(out), batch, *shape, no_squarings,
         2.0 ** -no_squarings, int(keep_history))
    return out, history


class _ScalingAndSquaring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, velocity: torch.Tensor, no_squarings: int) -> torch.Tensor:
        out, history = _integrate(velocity, no_squarings, keep_history=True)
        ctx.save_for_backward(history)
        ctx.no_squarings = no_squarings
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (history,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, _, *shape = grad_out.shape
        grad_velocity = torch.empty_like(grad_out)
        call("svf_backward", grad_out.dtype, _ptr(history), _ptr(grad_out), _ptr(grad_velocity), batch, *shape,
              ctx.no_squarings, 2.0 ** -ctx.no_squarings)
        return grad_velocity, None


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        image, displacement = image.contiguous(), displacement.contiguous()
        batch, channels, *shape = image.shape
        out = torch.empty_like(image)
        call("warp_forward", image.dtype, _ptr(image), _ptr(displacement), _ptr(out), batch, channels, *shape)
        ctx.save_for_backward(image, displacement)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        image, displacement = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, channels, *shape = image.shape
        grad_displacement = torch.empty_like(displacement)
        call("warp_backward", image.dtype, _ptr(image), _ptr(displacement), _ptr(grad_out), _ptr(grad_displacement),
             batch, channels, *shape)
        return None, grad_displacement


def scaling_and_squaring(velocity: torch.Tensor, no_squarings: int) -> torch.Tensor:
    """Displacement of exp(v) in voxel units; velocity (B, 3, D, H, W), voxel units (CPU, when ``usable``)."""
    if no_squarings < 1:
        raise ValueError(f"scaling_and_squaring: no_squarings must be >= 1, got {no_squarings}")
    if torch.is_grad_enabled() and velocity.requires_grad:
        return _ScalingAndSquaring.apply(velocity, no_squarings)
    return _integrate(velocity, no_squarings, keep_history=False)[0]  # no backward: two fields of scratch


def warp_border(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """image (B, C, D, H, W) sampled trilinearly at x + displacement(x) (B, 3, D, H, W, voxel units), border padding.

    Differentiable with respect to the displacement only: the caller uses ``grid_sample`` when the image needs a
    gradient.
    """
    return _Warp.apply(image, displacement)
