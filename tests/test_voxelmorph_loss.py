"""VoxelMorph's loss: its flow regulariser against an analytic field and a numpy transcription of VoxelMorph's
Grad('l2'), and the per-voxel data term of a (frozen) metric."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.similarity import SimilarityMetric
from model.voxelmorph_loss import VxmLoss
from utils.regulariser import flow_gradient_l2


def numpy_grad_l2(flow: np.ndarray) -> np.ndarray:
    """VoxelMorph's Grad('l2') per pair, written from its definition: for each spatial axis the mean of the squared
    differences of neighbours along it (no padding), then the mean of the three."""
    per_axis = []
    for axis in (2, 3, 4):
        d = np.diff(flow, axis=axis)
        per_axis.append((d ** 2).reshape(flow.shape[0], -1).mean(1))
    return (per_axis[0] + per_axis[1] + per_axis[2]) / 3.0


def test_gradient_penalty_matches_voxelmorphs_definition():
    flow = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    np.testing.assert_allclose(flow_gradient_l2(flow).numpy(), numpy_grad_l2(flow.numpy()), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gradient_penalty_of_a_linear_field(axis):
    """v_k(x) = a x_axis for every component: squared differences a^2 along ``axis`` only, for all 3 components."""
    shape, slope = (6, 7, 8), 0.5
    coordinate = torch.arange(shape[axis], dtype=torch.float64) * slope
    view = [1, 1, 1]
    view[axis] = -1
    flow = coordinate.view(1, 1, *view).expand(1, 3, *shape)
    assert flow_gradient_l2(flow).item() == pytest.approx(slope ** 2 / 3.0)
    assert flow_gradient_l2(torch.zeros(1, 3, *shape)).item() == 0.0


def test_loss_is_the_per_voxel_data_term_plus_the_weighted_penalty():
    torch.manual_seed(0)
    fixed, warped = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    mask = (torch.rand(2, 1, 8, 8, 8) > 0.3).float()
    velocity = torch.randn(2, 3, 4, 4, 4)
    terms = VxmLoss(SimilarityMetric("SSD", learnable=False), w_reg=0.25, int_downsize=2)(fixed, warped, velocity,
                                                                                              mask)
    ssd = 0.5 * ((fixed - warped) ** 2 * mask).flatten(1).sum(1) / 8 ** 3
    torch.testing.assert_close(terms["data_term"], ssd)
    torch.testing.assert_close(terms["reg_term"], 0.25 * 2 * torch.as_tensor(numpy_grad_l2(velocity.numpy())))
    torch.testing.assert_close(terms["loss"], terms["data_term"] + terms["reg_term"])


def test_a_learnt_metric_is_frozen_but_passes_gradients_to_the_warped_image():
    torch.manual_seed(0)
    metric = SimilarityMetric("LCC", learnable=True)
    loss = VxmLoss(metric, w_reg=1.0, int_downsize=2)
    assert not any(p.requires_grad for p in loss.parameters())
    fixed, warped = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    loss(fixed, warped, torch.zeros(1, 3, 4, 4, 4), torch.ones(1, 1, 8, 8, 8))["loss"].sum().backward()
    assert warped.grad is not None and warped.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())
