"""The objectives of METHOD.md: the q_v loss of one iteration and the contrastive theta/q_f loss."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QF, QV
from utils.flow import warp
from utils.regulariser import reg_term
from utils.sobolev import separable_filter, sobolev_precondition


class Energy(nn.Module):
    """Data term + regulariser - entropy of q_v, for the two antithetic samples processed as one batch.

    ``sobolev_kernel`` None disables the preconditioner; ``noise_magnitude`` (voxels) > 0 adds U(-a, a)
    to the transformation before warping, as the reference's ``uniform_noise``.
    """

    def __init__(self, transformation: SVF, similarity: SimilarityMetric, w_reg: float,
                 sobolev_kernel: torch.Tensor | None, noise_magnitude: float):
        super().__init__()
        self.transformation, self.similarity = transformation, similarity
        self.w_reg, self.noise_magnitude = w_reg, noise_magnitude
        self.register_buffer("sobolev_kernel", sobolev_kernel, persistent=False)

    def on_grid(self, dims: Sequence[int]) -> "Energy":
        """The same objective (metric, w_reg, Sobolev kernel, noise) on another grid, e.g. a pyramid level.

        Only a dense SVF has a velocity on every grid; an SVFFD's control points are tied to its grid.
        """
        if type(self.transformation) is not SVF:
            raise ValueError(f"{type(self.transformation).__name__}: only an SVF can move to another grid")
        return Energy(SVF(dims, self.transformation.no_squarings), self.similarity, self.w_reg, self.sobolev_kernel,
                      self.noise_magnitude)

    def smooth(self, velocity: torch.Tensor) -> torch.Tensor:
        """Sobolev-smoothed velocity whose gradient passes straight through (identity when disabled)."""
        if self.sobolev_kernel is None:
            return velocity
        if torch.is_grad_enabled() and velocity.requires_grad:
            return sobolev_precondition(velocity, self.sobolev_kernel)
        return separable_filter(velocity, self.sobolev_kernel.to(velocity.dtype))

    def smoothed_displacement(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity -> (S(v), displacement of exp(S(v))), both (B, 3, ...) in voxel units: the one path from a
        velocity (sample or mean of q_v) to the transformation; the regulariser needs S(v) too."""
        smoothed = self.smooth(velocity)
        return smoothed, self.transformation(smoothed)

    def displacement(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement u (B, 3, *dims), voxel units, of phi = exp(S(v)) = id + u."""
        return self.smoothed_displacement(velocity)[1]

    def warp_moving(self, moving: torch.Tensor, displacement: torch.Tensor, noisy: bool) -> torch.Tensor:
        """M o (id + u), with uniform noise on u when ``noisy`` and noise is enabled."""
        if noisy and self.noise_magnitude > 0:
            noise = torch.rand_like(displacement).mul_(2.0).sub_(1.0).mul_(self.noise_magnitude)
            displacement = displacement + noise
        return warp(moving, displacement)

    def q_v_loss(self, q_v: QV, fixed_features: torch.Tensor, moving: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over pairs of (data1 + data2)/2 + (reg1 + reg2)/2 - [(ent1 + ent2)/2 + ent_closed_form].

        ``fixed_features`` is f(F), computed once per batch since theta is fixed during the q_v iterations.
        Returns the loss and the per-pair terms (detached) for logging.
        """
        batch = moving.shape[0]
        v1, v2 = q_v.sample()
        entropy_samples = 0.5 * (q_v.entropy_sample_term(v1) + q_v.entropy_sample_term(v2))
        samples = torch.cat([v1, v2])
        smoothed, displacement = self.smoothed_displacement(samples)
        warped = self.warp_moving(moving.repeat(2, 1, 1, 1, 1), displacement, noisy=True)
        data = self.similarity.data_term_from_features(
            fixed_features.repeat(2, 1, 1, 1, 1), self.similarity.features(warped), mask.repeat(2, 1, 1, 1, 1))
        data = data.view(2, batch).mean(0)
        reg = reg_term(smoothed, self.w_reg).view(2, batch).mean(0)
        entropy = entropy_samples + q_v.entropy_closed_form()
        loss = data + reg - entropy
        terms = {"loss": loss, "data_term": data, "reg_term": reg, "entropy_term": entropy}
        return loss.sum(), {k: t.detach() for k, t in terms.items()}

    @torch.no_grad()
    def sample_warped(self, q_v: QV, moving: torch.Tensor) -> torch.Tensor:
        """Three warps M o phi (3B, 1, D, H, W) of one sample v ~ q_v (smoothed), for the theta/q_f step.

        As in the reference, each of the three energy terms of the contrastive loss warps M anew, so each gets its
        own draw of the uniform noise; the velocity sample and its transformation are shared.
        """
        displacement = self.displacement(q_v.sample()[0]).repeat(3, 1, 1, 1, 1)
        return self.warp_moving(moving.repeat(3, 1, 1, 1, 1), displacement, noisy=True)


class ContrastiveLoss(nn.Module):
    """[E(F, M o phi) - (E(F1, M o phi) + E(F2, M o phi)) / 2] / batch, F1, F2 an antithetic pair from q_f.

    theta and q_f live in this one module so that a single DistributedDataParallel wrapper averages both
    gradients over ranks.
    """

    def __init__(self, similarity: SimilarityMetric, q_f: QF):
        super().__init__()
        self.similarity, self.q_f = similarity, q_f

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """fixed, mask (B, 1, D, H, W); warped (3B, 1, D, H, W): the warps of ``Energy.sample_warped``, one per term."""
        batch = fixed.shape[0]
        fixed_1, fixed_2 = self.q_f(fixed)
        fixed_features = self.similarity.features(torch.cat([fixed, fixed_1, fixed_2]))
        warped_features = self.similarity.features(warped)
        energy = self.similarity.data_term_from_features(fixed_features, warped_features,
                                                         mask.repeat(3, 1, 1, 1, 1)).view(3, batch)
        return (energy[0] - 0.5 * (energy[1] + energy[2])).sum() / batch
