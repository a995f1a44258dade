"""Transformation models: an SVF on the image grid, or an SVF parametrised by cubic B-splines (SVFFD)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from utils.bspline import bspline_velocity, control_grid_shape
from utils.flow import NO_SQUARINGS, integrate_velocity


class SVF(nn.Module):
    """phi = exp(v), v a dense velocity on the image grid (voxel units)."""

    def __init__(self, dims: Sequence[int], no_squarings: int = NO_SQUARINGS):
        super().__init__()
        self.dims = tuple(dims)
        self.no_squarings = no_squarings

    @property
    def velocity_shape(self) -> tuple[int, ...]:
        """Spatial shape of the parameters of v (and so of q_v)."""
        return self.dims

    def dense_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        """The velocity on the image grid (B, 3, *dims), voxel units."""
        return velocity

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement u of phi = id + u (B, 3, *dims), voxel units."""
        return integrate_velocity(self.dense_velocity(velocity), self.no_squarings)


class SVFFD(SVF):
    """phi = exp(v), v a cubic B-spline with control points every ``cps`` voxels (values in voxel units)."""

    def __init__(self, dims: Sequence[int], cps: Sequence[int], no_squarings: int = NO_SQUARINGS):
        super().__init__(dims, no_squarings)
        self.cps = tuple(cps)

    @property
    def velocity_shape(self) -> tuple[int, ...]:
        return control_grid_shape(self.dims, self.cps)

    def dense_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        return bspline_velocity(velocity, self.dims, self.cps)
