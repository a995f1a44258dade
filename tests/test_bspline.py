"""utils.bspline and the SVFFD model: analytic B-spline identities and scipy.interpolate.BSpline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from model.transformation import SVF, SVFFD
from utils.bspline import bspline_kernel, bspline_velocity, control_grid_shape, cubic_bspline

STRIDES = [1, 2, 3]


def scipy_design_matrix(n: int, c: int, no_control: int) -> np.ndarray:
    """(n, no_control) cubic B-spline basis at voxels 0..n-1, control point i at voxel (i - 1) * c.

    Uniform knots t_j = (j - 3) c: scipy's basis j spans [t_j, t_{j+4}] and is centred at (j - 1) c.
    """
    knots = c * (np.arange(no_control + 4, dtype=np.float64) - 3)
    return BSpline.design_matrix(np.arange(n, dtype=np.float64), knots, 3).toarray()


def scipy_tensor_product(control: np.ndarray, dims, cps) -> np.ndarray:
    """Dense field (C, *dims) from control values (C, *control_shape) by scipy's 1D bases along each axis."""
    m = [scipy_design_matrix(n, c, k) for n, c, k in zip(dims, cps, control.shape[1:])]
    return np.einsum("ai,bj,ck,nijk->nabc", *m, control)


@pytest.mark.parametrize("dims, cps, expected", [
    ((32, 32, 32), (2, 2, 2), (19, 19, 19)),
    ((9, 10, 11), (2, 3, 3), (7, 6, 7)),
    ((5, 7, 13), (1, 2, 4), (7, 6, 6)),
    ((8, 9, 16), (3, 4, 5), (6, 5, 6)),
])
def test_control_grid_shape(dims, cps, expected):
    shape = control_grid_shape(dims, cps)
    assert shape == expected
    for n, c, k in zip(dims, cps, shape):
        # the control points 1 .. k - 2 cover voxels 0 .. n - 1, with one extra on each side
        assert (k - 3) * c >= n - 1 > (k - 4) * c


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5])
def test_kernel_sums_to_the_stride_and_peaks_at_two_thirds(stride):
    kernel = bspline_kernel(stride)
    assert kernel.numel() == 4 * stride - 1
    torch.testing.assert_close(kernel.sum(), torch.tensor(float(stride), dtype=torch.float64), rtol=0, atol=1e-12)
    assert kernel[2 * stride - 1] == pytest.approx(2.0 / 3.0)
    torch.testing.assert_close(kernel, kernel.flip(0))
    assert torch.all(kernel > 0)


def test_cubic_bspline_values():
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -1.0], dtype=torch.float64)
    expected = torch.tensor([2 / 3, 23 / 48, 1 / 6, 1 / 48, 0.0, 0.0, 1 / 6], dtype=torch.float64)
    torch.testing.assert_close(cubic_bspline(t), expected)


@pytest.mark.parametrize("cps", [(1, 1, 1), (2, 2, 2), (3, 2, 1), (2, 3, 3)])
def test_partition_of_unity(cps):
    dims = (9, 10, 11)
    control = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64).view(1, 3, 1, 1, 1)
    control = control.expand(1, 3, *control_grid_shape(dims, cps)).contiguous()
    dense = bspline_velocity(control, dims, cps)
    assert dense.shape == (1, 3, *dims)
    torch.testing.assert_close(dense, control[..., :1, :1, :1].expand_as(dense), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cps", [(1, 1, 1), (2, 2, 2), (3, 2, 1), (2, 3, 3)])
def test_linear_reproduction(cps):
    dims = (9, 10, 11)
    shape = control_grid_shape(dims, cps)
    positions = torch.stack(torch.meshgrid(
        *[(torch.arange(k, dtype=torch.float64) - 1) * c for k, c in zip(shape, cps)], indexing="ij"))
    voxels = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in dims], indexing="ij"))
    a = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4], [-0.7, 0.2, 0.05]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).view(3, 1, 1, 1)
    control = (torch.einsum("kj,jxyz->kxyz", a, positions) + b).unsqueeze(0)
    expected = (torch.einsum("kj,jxyz->kxyz", a, voxels) + b).unsqueeze(0)
    torch.testing.assert_close(bspline_velocity(control, dims, cps), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride", STRIDES)
def test_value_on_a_control_point_is_the_one_four_one_average(stride):
    dims = (13, 12, 14)
    cps = (stride,) * 3
    shape = control_grid_shape(dims, cps)
    control = torch.randn(1, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(stride))
    dense = bspline_velocity(control, dims, cps)[0, 0]
    weights = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64) / 6.0
    w3 = torch.einsum("i,j,k->ijk", weights, weights, weights)
    for index in [(1, 1, 1), (2, 3, 2), (shape[0] - 3, 2, shape[2] - 3)]:
        voxel = tuple((i - 1) * stride for i in index)
        if any(v >= n for v, n in zip(voxel, dims)):
            continue
        neighbourhood = control[0, 0, index[0] - 1:index[0] + 2, index[1] - 1:index[1] + 2,
                                index[2] - 1:index[2] + 2]
        assert dense[voxel].item() == pytest.approx((w3 * neighbourhood).sum().item(), abs=1e-12)


def test_value_on_a_control_point_in_1d():
    # control values constant across axes 1, 2: the field along axis 0 is (c_{i-1} + 4 c_i + c_{i+1}) / 6
    dims, cps = (12, 4, 4), (2, 2, 2)
    shape = control_grid_shape(dims, cps)
    values = torch.randn(shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    control = values.view(1, 1, -1, 1, 1).expand(1, 1, *shape).contiguous()
    dense = bspline_velocity(control, dims, cps)[0, 0, :, 0, 0]
    for i in range(1, shape[0] - 1):
        voxel = (i - 1) * 2
        if voxel < dims[0]:
            expected = (values[i - 1] + 4 * values[i] + values[i + 1]) / 6
            assert dense[voxel].item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("stride", STRIDES)
def test_separable_control_grid_matches_scipy(stride):
    dims, cps = (10, 11, 9), (stride,) * 3
    shape = control_grid_shape(dims, cps)
    rng = np.random.default_rng(stride)
    factors = [rng.standard_normal(k) for k in shape]
    control = np.einsum("i,j,k->ijk", *factors)[None]
    dense = bspline_velocity(torch.from_numpy(control)[None], dims, cps)[0, 0].numpy()
    curves = [BSpline(c * (np.arange(k + 4) - 3.0), f, 3)(np.arange(n, dtype=np.float64))
              for n, c, k, f in zip(dims, cps, shape, factors)]
    np.testing.assert_allclose(dense, np.einsum("a,b,c->abc", *curves), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cps", [(1, 1, 1), (2, 2, 2), (3, 3, 3), (1, 2, 3), (3, 1, 2)])
def test_random_control_grid_matches_scipy(cps):
    dims = (10, 11, 9)
    shape = control_grid_shape(dims, cps)
    control = np.random.default_rng(sum(cps)).standard_normal((3, *shape))
    dense = bspline_velocity(torch.from_numpy(control)[None], dims, cps)[0].numpy()
    np.testing.assert_allclose(dense, scipy_tensor_product(control, dims, cps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cps", [(1, 2, 3), (2, 2, 2)])
def test_gradcheck(cps):
    dims = (4, 5, 6)
    control = torch.randn(1, 2, *control_grid_shape(dims, cps), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: bspline_velocity(c, dims, cps), (control,))


@pytest.mark.parametrize("dims, cps", [((9, 10, 11), (2, 2, 2)), ((8, 12, 10), (3, 2, 4))])
def test_svffd_module(dims, cps):
    model = SVFFD(dims, cps)
    assert model.velocity_shape == control_grid_shape(dims, cps)
    assert SVF(dims).velocity_shape == tuple(dims)
    control = 0.5 * torch.randn(2, 3, *model.velocity_shape, generator=torch.Generator().manual_seed(1))
    displacement = model(control)
    assert displacement.shape == (2, 3, *dims)
    # a constant control grid is a constant velocity, hence a translation
    constant = torch.tensor([0.5, -1.0, 1.5]).view(1, 3, 1, 1, 1).expand(1, 3, *model.velocity_shape)
    torch.testing.assert_close(model(constant.contiguous()), constant[..., :1, :1, :1].expand(1, 3, *dims),
                               rtol=0, atol=1e-5)
    assert math.prod(model.velocity_shape) < math.prod(dims)
