"""The loss that trains VoxelMorph with a similarity metric: data_term(F, M o phi) / N + w_reg * GradL2(v)."""
from __future__ import annotations

import math

import torch
from torch import nn

from model.similarity import SimilarityMetric
from utils.regulariser import flow_gradient_l2


class VxmLoss(nn.Module):
    """Data term of a frozen similarity metric plus VoxelMorph's flow regulariser, per pair.

    - data term: the metric's data term (SSD 0.5 sum z, LCC -sum z, baseline or learnt) inside the fixed mask,
      divided by the number of voxels N of the grid. The division makes it a per-voxel mean, as VoxelMorph's own
      MSE and NCC losses are, so that w_reg has VoxelMorph's scale; it does not change the metric's minimisers.
    - regulariser: ``flow_gradient_l2`` of the velocity before integration (at 1 / int_downsize resolution),
      times int_downsize, as VoxelMorph's training script weights it (``Grad('l2', loss_mult=int_downsize)``).

    The metric's parameters are frozen: VoxelMorph learns, theta does not.
    """

    def __init__(self, similarity: SimilarityMetric, w_reg: float, int_downsize: int):
        super().__init__()
        self.similarity = similarity.requires_grad_(False).eval()
        self.w_reg, self.int_downsize = w_reg, int_downsize

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, velocity: torch.Tensor,
                mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'loss', 'data_term', 'reg_term'}, each (B,); images (B, 1, *dims), velocity (B, 3, ...), voxel units."""
        voxels = math.prod(fixed.shape[2:])
        data = self.similarity(fixed, warped, mask) / voxels
        reg = self.w_reg * self.int_downsize * flow_gradient_l2(velocity)
        return {"loss": data + reg, "data_term": data, "reg_term": reg}
