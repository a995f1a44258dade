"""data_loader.geometry: the pad-to-cube-and-resize map, checked against world coordinates and scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from data_loader.geometry import resample_to_input, resample_to_working, working_affine, working_to_input

INPUT_AFFINE = np.array([[-1.2, 0.1, 0.0, 30.0],
                         [0.05, 1.1, 0.2, -20.0],
                         [0.0, -0.1, 1.5, 12.0],
                         [0.0, 0.0, 0.0, 1.0]])


def voxel_coords(shape) -> np.ndarray:
    """Homogeneous voxel coordinates (4, N) of every voxel of ``shape``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return np.concatenate([index, np.ones((1, index.shape[1]))]).astype(np.float64)


def world_function(world: np.ndarray) -> np.ndarray:
    """A linear function of world position (4, N): trilinear interpolation reproduces it exactly."""
    return 0.3 * world[0] - 0.2 * world[1] + 0.1 * world[2] + 5.0


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 24, 16)])
def test_identity_when_dims_equal_input_shape(shape):
    np.testing.assert_array_equal(working_to_input(shape, shape), np.eye(4))
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    assert resample_to_working(array, shape, shape, "linear") is array
    assert resample_to_input(array, shape, shape, "nearest") is array


def test_known_map_for_a_non_cubic_input():
    # cube side 24: pads (2, 0, 4) before; working voxel j -> padded voxel j * 23 / 15
    matrix = working_to_input((20, 24, 16), (16, 16, 16))
    np.testing.assert_allclose(np.diag(matrix)[:3], [23 / 15] * 3)
    np.testing.assert_allclose(matrix[:3, 3], [-2, 0, -4])
    # the working centre 7.5 is the cube centre 11.5, i.e. the input centre ((n - 1) / 2 per axis)
    np.testing.assert_allclose(matrix @ [7.5, 7.5, 7.5, 1], [9.5, 11.5, 7.5, 1])


@pytest.mark.parametrize("input_shape, dims", [((20, 24, 16), (16, 16, 16)), ((12, 12, 12), (20, 18, 16)),
                                               ((17, 9, 13), (8, 8, 8))])
def test_world_coordinates_agree(input_shape, dims):
    # a value defined in world space, sampled onto the working grid, must equal that function at working_affine
    world_in = INPUT_AFFINE @ voxel_coords(input_shape)
    image = world_function(world_in).reshape(input_shape)
    resampled = resample_to_working(image, input_shape, dims, "linear")
    world_working = working_affine(INPUT_AFFINE, input_shape, dims) @ voxel_coords(dims)
    position = (working_to_input(input_shape, dims) @ voxel_coords(dims))[:3]  # input voxel of each working voxel
    upper = np.array(input_shape)[:, None] - 1
    inside = np.all((position >= -1e-9) & (position <= upper + 1e-9), axis=0)
    padding = np.any((position <= -1) | (position >= upper + 1), axis=0)  # a voxel or more into the padding
    np.testing.assert_allclose(resampled.reshape(-1)[inside], world_function(world_working)[inside], atol=1e-9)
    assert (resampled.reshape(-1)[padding] == 0).all()


@pytest.mark.parametrize("input_shape, dims", [((20, 24, 16), (16, 16, 16)), ((10, 10, 10), (17, 15, 13))])
def test_linear_matches_scipy(input_shape, dims):
    image = np.random.default_rng(1).random(input_shape)
    ours = resample_to_working(image, input_shape, dims, "linear")
    coords = (working_to_input(input_shape, dims) @ voxel_coords(dims))[:3]
    reference = map_coordinates(image, coords, order=1, mode="grid-constant", cval=0.0).reshape(dims)
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_nearest_keeps_labels_and_geometry():
    input_shape, dims = (24, 20, 28), (32, 32, 32)
    labels = np.zeros(input_shape, dtype=np.int64)
    labels[4:12, 5:15, 6:20] = 2035
    labels[14:20, 3:9, 10:25] = 17
    labels[2:5, 2:5, 2:5] = 10
    resampled = resample_to_working(labels, input_shape, dims, "nearest")
    assert resampled.dtype == np.int64
    assert set(np.unique(resampled)) == {0, 10, 17, 2035}
    # nearest and linear agree on where each structure is (centroid in world coordinates)
    affine = working_affine(INPUT_AFFINE, input_shape, dims)
    for label in (17, 2035):
        soft = resample_to_working((labels == label).astype(np.float64), input_shape, dims, "linear")
        centroid_soft = affine[:3, :3] @ (voxel_coords(dims)[:3] @ soft.reshape(-1) / soft.sum())
        hard = (resampled == label).reshape(-1)
        centroid_hard = affine[:3, :3] @ voxel_coords(dims)[:3, hard].mean(axis=1)
        assert np.abs(centroid_soft - centroid_hard).max() < 0.3
    mask = resample_to_working(labels > 0, input_shape, dims, "nearest")
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, resampled > 0)


def test_centre_blob_stays_at_centre_of_non_cubic_input():
    input_shape, dims = (20, 24, 16), (16, 16, 16)
    centre = (np.array(input_shape) - 1) / 2
    distance = np.sqrt(((voxel_coords(input_shape)[:3] - centre[:, None]) ** 2).sum(axis=0)).reshape(input_shape)
    blob = np.exp(-distance ** 2 / 8)
    resampled = resample_to_working(blob, input_shape, dims, "linear")
    centroid = voxel_coords(dims)[:3] @ resampled.reshape(-1) / resampled.sum()
    np.testing.assert_allclose(centroid, [7.5, 7.5, 7.5], atol=1e-6)
    assert np.unravel_index(resampled.argmax(), dims) in [(i, j, k) for i in (7, 8) for j in (7, 8) for k in (7, 8)]


@pytest.mark.parametrize("input_shape, dims", [((20, 24, 16), (16, 16, 16)), ((16, 16, 16), (24, 24, 24))])
def test_round_trip_of_a_smooth_image(input_shape, dims):
    world = INPUT_AFFINE @ voxel_coords(input_shape)
    image = world_function(world).reshape(input_shape)
    back = resample_to_input(resample_to_working(image, input_shape, dims, "linear"), input_shape, dims, "linear")
    # linear functions survive two linear resamplings, except within a voxel of the zero-padded border
    interior = (slice(2, -2),) * 3
    np.testing.assert_allclose(back[interior], image[interior], atol=1e-9)


def test_labels_round_trip_with_upsampling_working_grid():
    # working grid finer than the input on every axis: nearest there and back returns every input voxel
    input_shape, dims = (12, 10, 14), (27, 27, 27)
    labels = np.random.default_rng(2).integers(0, 60, size=input_shape)
    back = resample_to_input(resample_to_working(labels, input_shape, dims, "nearest"), input_shape, dims,
                             "nearest")
    np.testing.assert_array_equal(back, labels)


def test_tensors_and_channels():
    input_shape, dims = (20, 24, 16), (16, 16, 16)
    field = torch.randn(3, *dims, dtype=torch.float32, requires_grad=True)
    on_input = resample_to_input(field, input_shape, dims, "linear")
    assert isinstance(on_input, torch.Tensor) and on_input.shape == (3, *input_shape)
    assert on_input.dtype == torch.float32
    on_input.sum().backward()  # differentiable
    assert field.grad is not None
    # each channel is resampled as a scalar image would be
    np.testing.assert_allclose(on_input[1].detach().numpy(),
                               resample_to_input(field[1].detach().numpy(), input_shape, dims, "linear"),
                               atol=1e-6)


@pytest.mark.parametrize("bad", [
    lambda: working_to_input((16, 16), (16, 16, 16)),
    lambda: working_to_input((16, 16, 16), (16, 1, 16)),
    lambda: resample_to_working(np.zeros((8, 8, 8)), (8, 8, 9), (4, 4, 4), "linear"),
    lambda: resample_to_working(np.zeros((8, 8, 8)), (8, 8, 8), (4, 4, 4), "cubic"),
])
def test_invalid_arguments(bad):
    with pytest.raises(ValueError):
        bad()
