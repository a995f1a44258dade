"""utils.sobolev: the kernel against numpy's inverse, the filter against scipy, the straight-through backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from utils.sobolev import separable_filter, sobolev_kernel, sobolev_precondition


def numpy_sobolev_kernel(s: int, lambda_: float) -> np.ndarray:
    """Middle column of inv(I - lambda L), L the (2s+1)-point 1D Laplacian (1, -2, 1), normalised to sum 1."""
    size = 2 * s + 1
    laplacian = np.zeros((size, size))
    for i in range(size):
        laplacian[i, i] = -2.0
        if i > 0:
            laplacian[i, i - 1] = 1.0
        if i < size - 1:
            laplacian[i, i + 1] = 1.0
    column = np.linalg.inv(np.eye(size) - lambda_ * laplacian)[:, s]
    return column / column.sum()


def scipy_separable_filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Full 3D correlation of each (D, H, W) volume with the outer-product kernel after edge padding."""
    radius = (len(kernel) - 1) // 2
    kernel_3d = np.einsum("i,j,k->ijk", kernel, kernel, kernel)
    out = np.empty_like(x)
    for index in np.ndindex(*x.shape[:2]):
        padded = np.pad(x[index], radius, mode="edge")
        full = ndimage.correlate(padded, kernel_3d, mode="constant")
        out[index] = full[radius:-radius, radius:-radius, radius:-radius]
    return out


@pytest.mark.parametrize("s", [1, 3, 5])
@pytest.mark.parametrize("lambda_", [0.5, 1.0, 2.5])
def test_kernel_matches_numpy_inverse(s, lambda_):
    kernel = sobolev_kernel(s, lambda_, dtype=torch.float64).numpy()
    expected = numpy_sobolev_kernel(s, lambda_)
    assert kernel.shape == (2 * s + 1,)
    np.testing.assert_allclose(kernel, expected, rtol=1e-12, atol=1e-15)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kernel, kernel[::-1], rtol=0, atol=1e-15)
    assert np.all(kernel > 0)
    assert np.argmax(kernel) == s  # it smooths: the centre weighs most


def test_reference_kernel_values_default_dtype():
    kernel = sobolev_kernel()
    assert kernel.dtype == torch.float32 and kernel.shape == (7,)
    np.testing.assert_allclose(kernel.numpy(), numpy_sobolev_kernel(3, 0.5), rtol=1e-6)


@pytest.mark.parametrize("kernel_kind", ["sobolev", "random_symmetric", "box"])
@pytest.mark.parametrize("shape", [(7, 8, 9), (9, 6, 11)])
def test_separable_filter_matches_full_3d_correlation(kernel_kind, shape):
    rng = np.random.default_rng(0)
    if kernel_kind == "sobolev":
        kernel = numpy_sobolev_kernel(3, 0.5)
    elif kernel_kind == "random_symmetric":
        half = rng.random(5)
        kernel = half + half[::-1]
    else:
        kernel = np.ones(3)
    x = rng.standard_normal((2, 3, *shape))
    out = separable_filter(torch.from_numpy(x), torch.from_numpy(kernel)).numpy()
    np.testing.assert_allclose(out, scipy_separable_filter(x, kernel), rtol=1e-12, atol=1e-12)


def test_constant_field_is_unchanged():
    x = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(2, 3, 8, 9, 10)
    out = separable_filter(x.contiguous(), sobolev_kernel(3, 0.5, dtype=torch.float64))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-14)


def test_smoothing_reduces_roughness():
    x = torch.randn(1, 3, 12, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = separable_filter(x, sobolev_kernel(3, 0.5, dtype=torch.float64))
    assert out.diff(dim=2).pow(2).sum() < 0.5 * x.diff(dim=2).pow(2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precondition_forward_is_the_filter_and_backward_is_identity(dtype):
    generator = torch.Generator().manual_seed(1)
    kernel = sobolev_kernel(3, 0.5)  # float32 kernel: the function casts it to x's dtype
    x = torch.randn(2, 3, 7, 8, 9, dtype=dtype, generator=generator, requires_grad=True)
    weights = torch.randn(2, 3, 7, 8, 9, dtype=dtype, generator=generator)
    out = sobolev_precondition(x, kernel)
    assert out.dtype == dtype
    torch.testing.assert_close(out, separable_filter(x.detach(), kernel.to(dtype)))
    (weights * out).sum().backward()
    torch.testing.assert_close(x.grad, weights, rtol=0, atol=0)
    # not the filter's true adjoint: that would smooth the gradient
    assert not torch.allclose(separable_filter(weights, kernel.to(dtype)), weights, atol=1e-3)
