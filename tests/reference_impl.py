"""A plain implementation of one q_v loss evaluation, written from METHOD.md, to check the fast one against.

Slow on purpose and structured differently from the production code: the two antithetic samples go one after
the other, the Sobolev smoothing is one full 3D convolution with the outer-product kernel, the LCC window a
full 3D box convolution, the B-spline an explicit tensor product of basis matrices, the identity grid is
rebuilt every time (in float64), the learnt features are evaluated layer by layer with F.conv3d and the
straight-through gradient of the Sobolev preconditioner is written as ``v + (S v - v).detach()``. It draws
its random numbers from the global generator in the order that METHOD.md lists them: e (voxelwise) and x
(one per pair) of the samples, then the uniform noise of both samples' transformations.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

NO_SQUARINGS = 12


def identity_grid(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """(1, D, H, W, 3), normalised, last axis (x, y, z) = (W, H, D) as grid_sample wants."""
    axes = [torch.arange(n, dtype=torch.float64) * (2.0 / (n - 1)) - 1.0 for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).unsqueeze(0).to(dtype)


def voxel_to_grid(displacement: torch.Tensor) -> torch.Tensor:
    """Voxel-unit displacement (B, 3, D, H, W), channel k along array axis k -> normalised (B, D, H, W, 3) (x, y, z)."""
    shape = displacement.shape[2:]
    parts = [displacement[:, k] * (2.0 / (shape[k] - 1)) for k in range(3)]
    return torch.stack(parts[::-1], dim=-1)


def grid_to_voxel(displacement: torch.Tensor) -> torch.Tensor:
    """Inverse of voxel_to_grid."""
    shape = displacement.shape[1:4]
    parts = [displacement[..., 2 - k] / (2.0 / (shape[k] - 1)) for k in range(3)]
    return torch.stack(parts, dim=1)


def sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear, border padding, align_corners=True."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def scaling_and_squaring(velocity: torch.Tensor) -> torch.Tensor:
    """Voxel-unit displacement of exp(v), v (B, 3, D, H, W) in voxel units."""
    shape = velocity.shape[2:]
    u = voxel_to_grid(velocity) / 2 ** NO_SQUARINGS  # (B, D, H, W, 3)
    for _ in range(NO_SQUARINGS):
        u_channels = u.permute(0, 4, 1, 2, 3)
        u = u + sample(u_channels, identity_grid(shape, u.dtype) + u).permute(0, 2, 3, 4, 1)
    return grid_to_voxel(u)


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    return torch.where(t < 1, (4 - 6 * t ** 2 + 3 * t ** 3) / 6, torch.where(t < 2, (2 - t) ** 3 / 6, 0 * t))


def bspline_dense(control: torch.Tensor, dims: Sequence[int], cps: Sequence[int]) -> torch.Tensor:
    """sum_ijk c_ijk B(x/c - (i-1)) B(y/c - (j-1)) B(z/c - (k-1)): control point i of an axis at voxel (i-1) c."""
    matrices = []
    for n, c, m in zip(dims, cps, control.shape[2:]):
        x = torch.arange(n, dtype=torch.float64).view(-1, 1)
        i = torch.arange(m, dtype=torch.float64).view(1, -1)
        matrices.append(cubic_bspline(x / c - (i - 1)).to(control.dtype))
    return torch.einsum("bcijk,xi,yj,zk->bcxyz", control, *matrices)


def sobolev_3d(x: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """One full 3D correlation with k (x) k (x) k per channel, replicate padding."""
    k = kernel_1d.to(x.dtype)
    r = (k.numel() - 1) // 2
    kernel = torch.einsum("i,j,k->ijk", k, k, k)
    channels = x.shape[1]
    return F.conv3d(F.pad(x, [r] * 6, mode="replicate"), kernel.expand(channels, 1, *kernel.shape), groups=channels)


def box_3d(x: torch.Tensor, s: int, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the (2s+1)^3 window (weights ``kernel`` (1, 1, k, k, k), else ones), replicate padding, per channel."""
    if kernel is None:
        kernel = torch.ones(1, 1, 2 * s + 1, 2 * s + 1, 2 * s + 1, dtype=x.dtype)
    return torch.cat([F.conv3d(F.pad(x[:, c:c + 1], [s] * 6, mode="replicate"), kernel) for c in range(x.shape[1])], 1)


def features(image: torch.Tensor, extractor) -> torch.Tensor:
    """f of METHOD.md with the weights of a model.similarity.FeatureExtractor; identity when None."""
    if extractor is None:
        return image
    x = image
    for conv in extractor.convs:
        x = F.leaky_relu(F.conv3d(F.pad(x, [1] * 6, mode="replicate"), conv.weight, conv.bias),
                         extractor.activation.negative_slope)
    return torch.einsum("bcxyz,c->bxyz", x, extractor.aggregation.weight[0, :, 0]).unsqueeze(1)


def data_term(kind: str, fixed_features: torch.Tensor, warped_features: torch.Tensor, mask: torch.Tensor,
              s: int = 1, window: torch.Tensor | None = None) -> torch.Tensor:
    """SSD: 0.5 sum z, LCC: -sum z (the reference's form, each voxel minus its own local mean), inside the mask."""
    if kind == "SSD":
        return 0.5 * ((fixed_features - warped_features) ** 2 * mask).sum(dim=(1, 2, 3, 4))
    n = float((2 * s + 1) ** 3)
    f = fixed_features - box_3d(fixed_features, s, window) / n
    w = warped_features - box_3d(warped_features, s, window) / n
    cross, var_f, var_w = box_3d(f * w, s, window), box_3d(f * f, s, window), box_3d(w * w, s, window)
    return -(cross ** 2 / (var_f * var_w + 1e-5) * mask).sum(dim=(1, 2, 3, 4))


def regulariser(v: torch.Tensor, w_reg: float) -> torch.Tensor:
    """0.5 w_reg sum of squared forward differences, each difference array replicate-padded at the far edge."""
    total = 0.0
    for axis in (2, 3, 4):
        forward = v.narrow(axis, 1, v.shape[axis] - 1) - v.narrow(axis, 0, v.shape[axis] - 1)
        forward = torch.cat([forward, forward.narrow(axis, -1, 1)], dim=axis)  # the last difference again
        total = total + (forward ** 2).sum(dim=(1, 2, 3, 4))
    return 0.5 * w_reg * total


def entropy_closed_form(log_var: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    sigma_sq = torch.exp(log_var)
    return 0.5 * (torch.log(1 + (u ** 2 / sigma_sq).sum(dim=(1, 2, 3, 4))) + log_var.sum(dim=(1, 2, 3, 4)))


def entropy_sample(v: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    sigma = torch.exp(0.5 * log_var)
    n, u_n = (v - mu) / sigma, u / sigma
    dims = (1, 2, 3, 4)
    return 0.5 * ((n ** 2).sum(dims) - (n * u_n).sum(dims) ** 2 / (1 + (u_n ** 2).sum(dims)))


def draw(shape: Sequence[int], dims: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """e ~ N(0, I) of the shape of mu, x ~ N(0, 1) per pair, then U(0, 1) for the noise of both samples."""
    batch = shape[0]
    e = torch.randn(tuple(shape), dtype=dtype)
    x = torch.randn((batch, 1, 1, 1, 1), dtype=dtype)
    return e, x, torch.rand((2 * batch, 3, *dims), dtype=dtype)


def q_v_loss(mu: torch.Tensor, log_var: torch.Tensor, u: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
             mask: torch.Tensor, *, kind: str, extractor, w_reg: float, sobolev_kernel: torch.Tensor | None,
             noise_magnitude: float, cps: Sequence[int] | None = None, window: torch.Tensor | None = None,
             draws: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Sum over the B pairs of (data1 + data2)/2 + (reg1 + reg2)/2 - [(ent1 + ent2)/2 + ent_closed_form].

    mu, log_var, u: (B, 3, ...) on the image grid (SVF) or on the control grid (SVFFD, ``cps`` given);
    images and mask (B, 1, D, H, W). ``draws``: the random numbers of ``draw``, drawn now when None.
    """
    batch, dims = moving.shape[0], moving.shape[2:]
    e, x, noise = draws if draws is not None else draw(mu.shape, dims, mu.dtype)
    offset = torch.exp(0.5 * log_var) * e + x * u
    samples = [mu + offset, mu - offset]
    noise = (noise * 2 - 1) * noise_magnitude
    with torch.no_grad():
        fixed_features = features(fixed, extractor)
    loss = entropy_closed_form(log_var, u).neg()
    for i, v in enumerate(samples):
        smoothed = v if sobolev_kernel is None else v + (sobolev_3d(v, sobolev_kernel) - v).detach()
        velocity = smoothed if cps is None else bspline_dense(smoothed, dims, cps)
        displacement = scaling_and_squaring(velocity) + noise[i * batch:(i + 1) * batch]
        warped = sample(moving, identity_grid(dims, moving.dtype) + voxel_to_grid(displacement))
        data = data_term(kind, fixed_features, features(warped, extractor), mask, window=window)
        loss = loss + 0.5 * (data + regulariser(smoothed, w_reg) - entropy_sample(v, mu, log_var, u))
    return loss.sum()


def control_grid_size(n: int, c: int) -> int:
    return math.ceil((n - 1) / c) + 1 + 2
