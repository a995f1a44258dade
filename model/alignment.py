"""An objective for theta beyond the paper (issue 20): rank the posterior's alignment above perturbations of it.

The paper's contrastive step compares E(F, M o phi) with the energies of q_f's samples F +/- e; for SSD with a linear
f that difference is -1/2 sum f(e)^2, whatever M and the alignment. Here the negatives are in the transformation
instead: the same F against M warped by one sample of q_v (the positive) and by that sample plus and minus random
velocity perturbations (the negatives; like the sample, each goes through the Sobolev smoothing), and the loss asks
the metric to score the positive as the best match, through dissimilarity ratios that do not change with the overall
gain of f:

    D_c = E_c - min E   (SSD: E_c = 1/2 sum_mask z >= 0; LCC: E_c + |mask| = sum_mask (1 - z) > 0)
    loss per pair = log(1 + sum_{c >= 1} (D_0 / D_c)^(1 / temperature)),  averaged over the pairs

with c = 0 the posterior's sample and c = 1..2K its perturbations. It is the softmax cross-entropy of picking the
posterior's alignment among the 2K + 1 candidates with logits -log(D_c) / temperature. q_f takes no part in it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.energy import Energy
from model.similarity import SimilarityMetric
from model.variational import QV


def smooth_perturbations(count: int, shape: Sequence[int], spacing: int, magnitude: float, device=None,
                         dtype=torch.float32) -> torch.Tensor:
    """``count`` random velocity fields for each of B pairs, smooth at the scale ``spacing``: (count, B, 3, *dims),
    voxel units.

    Per field: N(0, 1) values on a grid of control points spread evenly over each axis (ends included) at most
    ``spacing`` voxels apart (1: every voxel, white noise), trilinearly interpolated to the velocity grid ``shape``
    (B, 3, *dims) (align_corners=True), then scaled so that its RMS vector length over the grid is exactly
    ``magnitude``.
    """
    batch, channels, *dims = shape
    coarse = [math.ceil((n - 1) / spacing) + 1 for n in dims]
    values = torch.randn(count * batch, channels, *coarse, device=device, dtype=dtype)
    fields = F.interpolate(values, size=dims, mode="trilinear", align_corners=True)
    rms = fields.pow(2).sum(1, keepdim=True).mean((2, 3, 4), keepdim=True).sqrt()
    return (fields * (magnitude / rms)).view(count, batch, channels, *dims)


def candidate_velocities(sample: torch.Tensor, perturbations: torch.Tensor) -> torch.Tensor:
    """The 2K + 1 candidates of each pair, candidate-major: v, v + d_1, v - d_1, ..., v + d_K, v - d_K.

    sample (B, 3, *dims), perturbations (K, B, 3, *dims) -> ((2K + 1) B, 3, *dims); row c * B + b is candidate c of
    pair b.
    """
    signed = torch.stack([sample + perturbations, sample - perturbations], 1).flatten(0, 1)
    return torch.cat([sample[None], signed]).flatten(0, 1)


@torch.no_grad()
def perturbed_warps(energy: Energy, q_v: QV, moving: torch.Tensor, no_perturbations: int, spacing: int,
                    magnitude: float) -> torch.Tensor:
    """M warped by the candidates of one sample v ~ q_v: ((2K + 1) B, 1, *dims), candidate-major.

    Each candidate velocity goes the way of a q_v sample (Sobolev smoothing, scaling and squaring) and, as in the
    paper's theta step, each warp draws its own uniform noise when noise is enabled.
    """
    sample = q_v.sample()[0]
    perturbations = smooth_perturbations(no_perturbations, sample.shape, spacing, magnitude, sample.device,
                                         sample.dtype)
    velocities = candidate_velocities(sample, perturbations)
    count = velocities.shape[0] // moving.shape[0]
    return energy.warp_moving(moving.repeat(count, 1, 1, 1, 1), energy.displacement(velocities), noisy=True)


def dissimilarity(kind: str, data_term: torch.Tensor, mask_size: torch.Tensor) -> torch.Tensor:
    """The data term minus its smallest value, >= 0: SSD 1/2 sum_mask z as it is; LCC -sum_mask z + |mask|.

    ``mask_size``: the sum of the fixed mask per pair, broadcast against ``data_term``. LCC's z < 1 by Cauchy-Schwarz
    while the window's weights are positive (they start as a box of ones).
    """
    if kind == "SSD":
        return data_term
    if kind == "LCC":
        return data_term + mask_size
    raise ValueError(f"unknown similarity metric {kind!r}: expected 'SSD' or 'LCC'")


def ranking_loss(dissimilarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """log(1 + sum_{c >= 1} (D_0 / D_c)^(1 / temperature)) per pair: (C, B) -> (B,), row 0 the positive."""
    logits = (dissimilarities[:1].log() - dissimilarities[1:].log()) / temperature
    return torch.logsumexp(torch.cat([torch.zeros_like(logits[:1]), logits]), 0)


class AlignmentRankingLoss(nn.Module):
    """The module docstring's loss of a batch: the mean over its pairs of ``ranking_loss``.

    theta is the module's only parameter set, so that DistributedDataParallel wrapping it averages theta's gradient
    over ranks, as it does for ContrastiveLoss.
    """

    def __init__(self, similarity: SimilarityMetric, temperature: float = 1.0):
        super().__init__()
        self.similarity, self.temperature = similarity, temperature

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """fixed, mask (B, 1, D, H, W); warped (C B, 1, D, H, W), C >= 2 candidates, candidate-major, the posterior's
        first (``perturbed_warps``)."""
        batch = fixed.shape[0]
        count = warped.shape[0] // batch
        if count < 2 or count * batch != warped.shape[0]:
            raise ValueError(f"expected the warps of 2 or more candidates for each of {batch} pairs, got "
                             f"{warped.shape[0]} warps")
        fixed_features = self.similarity.features(fixed).repeat(count, 1, 1, 1, 1)
        masks = mask.repeat(count, 1, 1, 1, 1)
        data = self.similarity.data_term_from_features(fixed_features, self.similarity.features(warped), masks)
        dissimilarities = dissimilarity(self.similarity.kind, data.view(count, batch), mask.flatten(1).sum(1))
        return ranking_loss(dissimilarities, self.temperature).sum() / batch
