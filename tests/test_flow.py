"""utils.flow: scaling and squaring against analytic flows, warping against np.roll and SimpleITK, gradcheck."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from utils.flow import NO_SQUARINGS, integrate_velocity, warp


def voxel_coordinates(shape, dtype=torch.float64) -> torch.Tensor:
    """(1, 3, *shape): channel k holds the index along array axis k."""
    axes = [torch.arange(n, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def smooth_field(shape, channels, magnitude, seed, sigma=2.0) -> np.ndarray:
    """(channels, *shape) Gaussian-smoothed noise scaled to max |value| = magnitude."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(channels)])
    return magnitude * field / np.abs(field).max()


def interior(array, margin):
    """The part of (..., D, H, W) at least ``margin`` voxels from every face."""
    return array[..., margin:-margin, margin:-margin, margin:-margin]


@pytest.mark.parametrize("shape", [(8, 8, 8), (9, 10, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_velocity_gives_zero_displacement(shape, dtype):
    displacement = integrate_velocity(torch.zeros(2, 3, *shape, dtype=dtype))
    assert displacement.shape == (2, 3, *shape) and displacement.dtype == dtype
    assert torch.count_nonzero(displacement) == 0


@pytest.mark.parametrize("shape", [(9, 10, 11), (12, 7, 5)])
@pytest.mark.parametrize("translation", [(1.0, 0.0, 0.0), (0.0, -2.5, 0.0), (0.0, 0.0, 0.75), (0.3, -1.2, 2.0)])
def test_constant_velocity_is_an_exact_translation(shape, translation):
    # u0 is constant, so every squaring doubles it (border padding keeps it constant): u = v exactly, per axis
    velocity = torch.tensor(translation, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    displacement = integrate_velocity(velocity.contiguous())
    torch.testing.assert_close(displacement, velocity, rtol=0, atol=1e-12)


LINEAR_FIELDS = [
    np.array([[0.03, -0.04, 0.01], [0.05, -0.02, 0.0], [-0.01, 0.03, 0.04]]),  # generic, not symmetric
    np.array([[0.0, -0.06, 0.0], [0.06, 0.0, 0.0], [0.0, 0.0, 0.0]]),  # a rotation about array axis 2
    np.diag([0.05, -0.03, 0.02]),  # anisotropic scaling
]


@pytest.mark.parametrize("matrix", LINEAR_FIELDS)
@pytest.mark.parametrize("shape", [(19, 20, 21), (21, 18, 19)])
def test_linear_velocity_integrates_to_the_matrix_exponential(matrix, shape):
    """v(x) = A (x - c) in voxel units, channel k along axis k, flows to u(x) = (expm(A) - I)(x - c).

    Trilinear interpolation reproduces affine maps exactly, so while no sample leaves the grid each squaring
    u <- u + u o (id + u) maps B (x - c) to ((I + B)^2 - I)(x - c): the scheme gives exactly
    ((I + A / 2^N)^(2^N) - I)(x - c), checked to rounding. That differs from expm(A) by at most
    |A|^2 exp(|A|) / (2 * 2^N) |x - c| (N = 12), the tolerance of the second comparison. Samples clamped at the
    border are wrong; each squaring carries that error at most one voxel inwards, damped by the interpolation
    weight (|u| < 1 voxel), so it decays geometrically: five voxels in it is below 1e-11 for these fields.
    """
    a = torch.tensor(matrix, dtype=torch.float64)
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    offset = voxel_coordinates(shape) - centre
    velocity = torch.einsum("kj,bjxyz->bkxyz", a, offset)
    displacement = integrate_velocity(velocity)

    steps = 2 ** NO_SQUARINGS
    discrete = torch.linalg.matrix_power(torch.eye(3, dtype=torch.float64) + a / steps, steps)
    exact = torch.linalg.matrix_exp(a)
    expected_discrete = torch.einsum("kj,bjxyz->bkxyz", discrete - torch.eye(3, dtype=torch.float64), offset)
    expected = torch.einsum("kj,bjxyz->bkxyz", exact - torch.eye(3, dtype=torch.float64), offset)

    margin = 5
    inside = (slice(None), slice(None), *[slice(margin, n - margin) for n in shape])
    torch.testing.assert_close(displacement[inside], expected_discrete[inside], rtol=0, atol=1e-10)

    norm_a = torch.linalg.matrix_norm(a, ord=2).item()
    bound = norm_a ** 2 * np.exp(norm_a) / (2 * steps)
    error = (displacement - expected)[inside].norm(dim=1)
    assert torch.all(error <= bound * offset[inside].norm(dim=1) + 1e-10)
    # and the field really moves: the test is not passing on a near-identity
    assert expected[inside].abs().max() > 0.2


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (2, -1, 1)])
def test_warp_by_integer_translation_is_a_roll(shift):
    shape = (9, 10, 11)
    image = torch.rand(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    displacement = torch.tensor(shift, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(2, 3, *shape)
    warped = warp(image, displacement).numpy()
    # warp samples image at x + shift, i.e. np.roll by -shift; wrapped voxels are clamped instead, skip them
    rolled = np.roll(image.numpy(), [-s for s in shift], axis=(2, 3, 4))
    margin = max(abs(s) for s in shift)
    np.testing.assert_allclose(interior(warped, margin), interior(rolled, margin), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8])
def test_nearest_warp_of_labels_keeps_labels_and_dtype(dtype):
    shape = (10, 11, 12)
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 7, 12, 49, 53], dtype=dtype)
    seg = labels[torch.randint(0, len(labels), (1, 1, *shape), generator=generator)]
    displacement = torch.from_numpy(smooth_field(shape, 3, 2.5, seed=2)).unsqueeze(0)
    warped = warp(seg, displacement, mode="nearest")
    assert warped.dtype == dtype and warped.shape == seg.shape
    assert set(warped.unique().tolist()) <= set(labels.tolist())
    # an integer shift moves labels exactly
    shifted = warp(seg, torch.tensor([1.0, -1.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape), mode="nearest")
    expected = np.roll(seg.numpy(), (-1, 1, -2), axis=(2, 3, 4))
    np.testing.assert_array_equal(interior(shifted.numpy(), 2), interior(expected, 2))


def sitk_resample_displacement(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Independent warp: image (D, H, W) at x + displacement(x), displacement (3, D, H, W) in array-axis order.

    SimpleITK indexes (x, y, z) = array axes (2, 1, 0), so the vector components are reversed.
    """
    moving = sitk.GetImageFromArray(image)
    field = sitk.GetImageFromArray(np.ascontiguousarray(displacement[::-1].transpose(1, 2, 3, 0)), isVector=True)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    return sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, -1000.0,
                                                sitk.sitkFloat64))


@pytest.mark.parametrize("shape", [(12, 14, 16), (15, 13, 11)])
@pytest.mark.parametrize("seed", [0, 1])
def test_warp_matches_simpleitk_displacement_field(shape, seed):
    image = smooth_field(shape, 1, 1.0, seed=seed, sigma=1.0)[0]
    displacement = smooth_field(shape, 3, 2.0, seed=seed + 10)
    ours = warp(torch.from_numpy(image)[None, None], torch.from_numpy(displacement)[None])[0, 0].numpy()
    theirs = sitk_resample_displacement(image, displacement)
    # compare where the sample point is inside the grid (SimpleITK gives the default value outside, we clamp)
    target = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")) + displacement
    inside = np.all([(target[k] >= 0) & (target[k] <= n - 1) for k, n in enumerate(shape)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=0, atol=1e-9)


@pytest.mark.parametrize("translation", [(0.4, -1.7, 2.25), (-2.6, 0.1, -0.5)])
def test_warp_matches_simpleitk_translation(translation):
    shape = (11, 12, 13)
    image = smooth_field(shape, 1, 1.0, seed=5, sigma=1.0)[0]
    displacement = torch.tensor(translation, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    ours = warp(torch.from_numpy(image)[None, None], displacement)[0, 0].numpy()
    moving = sitk.GetImageFromArray(image)
    transform = sitk.TranslationTransform(3, tuple(float(t) for t in translation[::-1]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, -1000.0,
                                                  sitk.sitkFloat64))
    margin = 3
    np.testing.assert_allclose(interior(ours, margin), interior(theirs, margin), rtol=0, atol=1e-9)


def test_gradcheck_integrate_velocity():
    velocity = (0.8 * torch.randn(1, 3, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    assert torch.autograd.gradcheck(integrate_velocity, (velocity.requires_grad_(),), eps=1e-6, atol=1e-5)


def test_gradcheck_warp_image_and_displacement():
    generator = torch.Generator().manual_seed(4)
    image = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    # non-integer displacements keep the samples off the kinks of trilinear interpolation
    displacement = (torch.rand(1, 3, 4, 5, 6, dtype=torch.float64, generator=generator) * 2.6 - 1.3)
    assert torch.autograd.gradcheck(warp, (image, displacement.requires_grad_()), eps=1e-6, atol=1e-5)
