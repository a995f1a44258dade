"""utils.regulariser: squared forward differences against analytic fields and a numpy transcription of the reference.

The reference (METHOD.md) replicate-pads each forward-difference array at the far edge, so the last difference
along each axis is counted twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.regulariser import reg_term, squared_forward_differences


def numpy_squared_forward_differences(velocity: np.ndarray) -> np.ndarray:
    """Per pair: sum of squared forward differences, each difference array edge-padded at the far end (np.pad)."""
    total = np.zeros(velocity.shape[0])
    for axis in range(2, 5):
        pad = [(0, 0)] * 5
        pad[axis] = (0, 1)
        forward = np.pad(np.diff(velocity, axis=axis), pad, mode="edge")
        assert forward.shape == velocity.shape
        total += (forward ** 2).reshape(velocity.shape[0], -1).sum(1)
    return total


@pytest.mark.parametrize("shape", [(6, 7, 8), (9, 5, 4)])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("slope", [0.5, -2.0])
def test_linear_field_along_one_axis(shape, axis, slope):
    coordinate = torch.arange(shape[axis], dtype=torch.float64) * slope
    view = [1, 1, 1]
    view[axis] = -1
    field = coordinate.view(*view).expand(*shape)
    # component k = (k + 1) * slope * x_axis: each component adds (k+1)^2 slope^2 per difference; n - 1 differences
    # per line plus the last one again (the reference's padding): one per voxel
    velocity = torch.stack([(k + 1) * field for k in range(3)]).unsqueeze(0)
    differences = math.prod(shape)
    expected = slope ** 2 * differences * (1 + 4 + 9)
    assert squared_forward_differences(velocity).item() == pytest.approx(expected, rel=1e-12)
    assert reg_term(velocity, 1.8).item() == pytest.approx(0.5 * 1.8 * expected, rel=1e-12)


def test_constant_field_has_no_cost():
    velocity = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(2, 3, 5, 6, 7)
    assert torch.count_nonzero(squared_forward_differences(velocity)) == 0


@pytest.mark.parametrize("shape", [(2, 3, 6, 7, 8), (1, 3, 4, 9, 5)])
def test_matches_numpy_with_edge_padding(shape):
    velocity = np.random.default_rng(sum(shape)).standard_normal(shape)
    ours = squared_forward_differences(torch.from_numpy(velocity)).numpy()
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, numpy_squared_forward_differences(velocity), rtol=1e-12)
    np.testing.assert_allclose(reg_term(torch.from_numpy(velocity), 2.0).numpy(), ours, rtol=1e-12)


def test_pairs_are_independent():
    generator = torch.Generator().manual_seed(0)
    velocity = torch.randn(3, 3, 5, 5, 5, dtype=torch.float64, generator=generator)
    per_pair = squared_forward_differences(velocity)
    for i in range(3):
        assert per_pair[i].item() == pytest.approx(squared_forward_differences(velocity[i:i + 1]).item())


def test_last_difference_is_counted_twice():
    """A jump between the last two voxels of one axis costs 2 jump^2 (the reference's padding), one elsewhere."""
    for position, expected in ((3, 1.0), (4, 2.0)):  # jump before voxel `position` of an axis of 5
        velocity = torch.zeros(1, 3, 5, 4, 4, dtype=torch.float64)
        velocity[:, 0, position:] = 1.0
        assert squared_forward_differences(velocity).item() == expected * 4 * 4
