"""Low-rank Gaussian variational posteriors: q_v over velocities (one per pair) and q_f over the fixed image."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.grid import ALIGN_CORNERS
from utils.low_rank_gaussian import entropy_closed_form, entropy_sample_term, sample_antithetic
from utils.pyramid import resize_velocity

Q_V_KEYS = ("mu", "log_var", "u")


class QV(nn.Module):
    """q_v for a batch of pairs: mu, log_var and u, each (B, 3, *velocity_shape), voxel units."""

    def __init__(self, mu: torch.Tensor, log_var: torch.Tensor, u: torch.Tensor):
        super().__init__()
        self.mu, self.log_var, self.u = nn.Parameter(mu), nn.Parameter(log_var), nn.Parameter(u)

    @classmethod
    def initial(cls, batch_size: int, velocity_shape: Sequence[int], sigma_init: float, u_init: float,
                device=None, dtype=torch.float32) -> "QV":
        """mu = 0, sigma = sigma_init, u = u_init everywhere."""
        shape = (batch_size, 3, *velocity_shape)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.full(shape, 2.0 * math.log(sigma_init), device=device, dtype=dtype),
                   torch.full(shape, u_init, device=device, dtype=dtype))

    @classmethod
    def from_states(cls, states: Sequence[dict[str, torch.Tensor]], device=None) -> "QV":
        """Stack per-pair states {mu, log_var, u: (3, *velocity_shape)} into a batch."""
        return cls(*(torch.stack([s[k] for s in states]).to(device) for k in Q_V_KEYS))

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Detached CPU copy of the parameters of pair i, for saving."""
        return {k: getattr(self, k).detach()[i].cpu().clone() for k in Q_V_KEYS}

    @torch.no_grad()
    def resized(self, shape: Sequence[int]) -> "QV":
        """This q_v on the grid ``shape`` (a pyramid's next level), as the start of inference there.

        mu is a velocity in voxel units: resampled trilinearly and scaled, per component, by the voxels of the new
        grid per old voxel (``utils.pyramid.resize_velocity``). log_var and u are resampled and not scaled: the
        spread that q_v settles at per voxel, in voxel units, is set by the curvature of the regulariser at a voxel
        (squared differences of neighbours), which is the same on every grid.
        """
        size = tuple(int(n) for n in shape)
        return QV(resize_velocity(self.mu, size),
                  *(F.interpolate(x, size=size, mode="trilinear", align_corners=ALIGN_CORNERS)
                    for x in (self.log_var, self.u)))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An antithetic pair of reparameterised samples of v."""
        return sample_antithetic(self.mu, self.log_var, self.u)

    def entropy_closed_form(self) -> torch.Tensor:
        """Log-determinant part of the entropy, per pair (B,)."""
        return entropy_closed_form(self.log_var, self.u)

    def entropy_sample_term(self, sample: torch.Tensor) -> torch.Tensor:
        """Sample-based part of the entropy, per pair (B,)."""
        return entropy_sample_term(sample, self.mu, self.log_var, self.u)

    @property
    def sigma(self) -> torch.Tensor:
        return torch.exp(0.5 * self.log_var)


class QF(nn.Module):
    """q_f over the fixed image: mean F (not learnt), learnt log_var and u of the image's shape."""

    def __init__(self, shape: Sequence[int], sigma_init: float = 0.1, u_init: float = 0.1):
        super().__init__()
        self.log_var = nn.Parameter(torch.full((1, 1, *shape), 2.0 * math.log(sigma_init)))
        self.u = nn.Parameter(torch.full((1, 1, *shape), u_init))

    @torch.no_grad()
    def project(self) -> None:
        """Keep sigma <= 1 and u in [-1, 1], as the reference did before every sampling."""
        self.log_var.clamp_(max=0.0)
        self.u.clamp_(-1.0, 1.0)

    def forward(self, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An antithetic pair of samples around ``fixed`` (B, 1, D, H, W), clamped to [0, 1]."""
        self.project()
        batch = fixed.shape[0]
        sample_1, sample_2 = sample_antithetic(torch.zeros_like(self.log_var), self.log_var, self.u)
        return ((fixed + sample_1.expand(batch, -1, -1, -1, -1)).clamp(0.0, 1.0),
                (fixed + sample_2.expand(batch, -1, -1, -1, -1)).clamp(0.0, 1.0))
