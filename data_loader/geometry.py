"""The reference pre-processing as geometry: pad the input to a cube, then resize the cube to the working ``dims``.

An input of shape (n0, n1, n2) is zero-padded to a cube of side N = max(n_i) with (N - n_i) // 2 voxels before,
and the cube is resized to ``dims`` with align_corners=True semantics: working voxel j of axis i sits at padded
voxel j (N - 1) / (dims_i - 1). Everything here is that one axis-aligned voxel map (``working_to_input``) and
sampling through it, so images, masks, labels and affines stay consistent. When the input already has the
working shape nothing is done (identity map), also for non-cubic inputs: the data are taken as pre-processed.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from utils.grid import ALIGN_CORNERS

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
MODES = {"linear": "bilinear", "nearest": "nearest"}  # our names -> grid_sample's (bilinear is trilinear in 3D)


def _shape3(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    """Validate a 3D shape with at least 2 voxels per axis (align_corners needs two voxel centres)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n < 2 for n in shape):
        raise ValueError(f"{name} must be 3 sizes >= 2, got {shape}")
    return shape


def working_to_input(input_shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    """Voxel-index map (4, 4) from working-grid voxels to input voxels: a scale and an offset per axis."""
    input_shape, dims = _shape3(input_shape, "input_shape"), _shape3(dims, "dims")
    matrix = np.eye(4)
    if input_shape == dims:
        return matrix
    side = max(input_shape)
    for axis, (n, d) in enumerate(zip(input_shape, dims)):
        matrix[axis, axis] = (side - 1) / (d - 1)
        matrix[axis, 3] = -((side - n) // 2)
    return matrix


def working_affine(input_affine: np.ndarray, input_shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine (4, 4) of the working grid, so working-grid outputs overlay the input in a viewer."""
    return np.asarray(input_affine, dtype=np.float64) @ working_to_input(input_shape, dims)


def _resample(array: ArrayT, matrix: np.ndarray, source_shape: tuple[int, int, int],
              target_shape: tuple[int, int, int], mode: str) -> ArrayT:
    """Sample ``array`` (*source_shape) or (C, *source_shape) at ``matrix`` @ target voxel; zero outside.

    Computed in float64 so that label ids survive exactly and both modes see identical coordinates.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    is_numpy = isinstance(array, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    if tuple(tensor.shape[-3:]) != source_shape or tensor.ndim not in (3, 4):
        raise ValueError(f"expected an array of shape {source_shape} or (C, *{source_shape}), "
                         f"got {tuple(tensor.shape)}")
    dtype = tensor.dtype
    source = tensor.reshape(1, -1, *source_shape).to(torch.float64)

    axes = []
    for axis in range(3):
        position = matrix[axis, axis] * np.arange(target_shape[axis]) + matrix[axis, 3]  # source voxel index
        axes.append(torch.as_tensor(2.0 * position / (source_shape[axis] - 1) - 1.0, device=tensor.device))
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1).unsqueeze(0)  # grid_sample wants (W, H, D) order
    sampled = F.grid_sample(source, grid, mode=MODES[mode], padding_mode="zeros", align_corners=ALIGN_CORNERS)
    sampled = sampled.reshape(*tensor.shape[:-3], *target_shape)

    if dtype == torch.bool:
        sampled = sampled > 0.5
    elif not dtype.is_floating_point:
        sampled = sampled.round().to(dtype)
    else:
        sampled = sampled.to(dtype)
    return sampled.numpy() if is_numpy else sampled


def resample_to_working(array: ArrayT, input_shape: Sequence[int], dims: Sequence[int], mode: str) -> ArrayT:
    """Input-grid array (*input_shape) or (C, *input_shape) -> working grid (*dims); mode 'linear' or 'nearest'.

    numpy in, numpy out; tensor in, tensor out (same device, dtype kept). Returned unchanged when shapes agree.
    """
    input_shape, dims = _shape3(input_shape, "input_shape"), _shape3(dims, "dims")
    if input_shape == dims:
        if tuple(array.shape[-3:]) != dims:
            raise ValueError(f"expected an array of shape {dims}, got {tuple(array.shape)}")
        return array
    return _resample(array, working_to_input(input_shape, dims), input_shape, dims, mode)


def resample_to_input(array: ArrayT, input_shape: Sequence[int], dims: Sequence[int], mode: str) -> ArrayT:
    """Working-grid array (*dims) or (C, *dims) -> input grid (*input_shape), the inverse of resample_to_working.

    Channels are resampled independently: vector components (e.g. displacements in working voxels) are not
    rescaled to input voxel units.
    """
    input_shape, dims = _shape3(input_shape, "input_shape"), _shape3(dims, "dims")
    if input_shape == dims:
        if tuple(array.shape[-3:]) != dims:
            raise ValueError(f"expected an array of shape {dims}, got {tuple(array.shape)}")
        return array
    return _resample(array, np.linalg.inv(working_to_input(input_shape, dims)), dims, input_shape, mode)


def displacement_to_world(displacement: ArrayT, affine: np.ndarray) -> ArrayT:
    """Voxel-unit displacement (3, D, H, W) along the array axes of a grid -> mm along the world axes of ``affine``.

    world_k = sum_j A[k, j] u_j with A the 3x3 part of the grid's voxel-to-world affine (scaling, rotation, flips).
    numpy in, numpy out; tensor in, tensor out.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if isinstance(displacement, np.ndarray):
        return np.einsum("kj,j...->k...", matrix, displacement).astype(displacement.dtype, copy=False)
    matrix = torch.as_tensor(matrix, dtype=displacement.dtype, device=displacement.device)
    return torch.einsum("kj,j...->k...", matrix, displacement)


def displacement_to_input_world(displacement: ArrayT, input_affine: np.ndarray, input_shape: Sequence[int],
                                 dims: Sequence[int]) -> ArrayT:
    """Working-grid displacement (3, *dims), working voxels -> input grid (3, *input_shape), mm, world axes.

    Resampled linearly (``resample_to_input`` keeps the components as they are), then each component k is scaled
    by the input voxels per working voxel along axis k (the diagonal of ``working_to_input``), then turned into
    world axes by the input affine. The result is the displacement x -> phi(x) - x of the fixed input grid's
    world points, e.g. for a NIfTI vector image with the fixed image's affine.
    """
    scale = np.diag(working_to_input(input_shape, dims))[:3]
    resampled = resample_to_input(displacement, input_shape, dims, "linear")
    if isinstance(resampled, np.ndarray):
        resampled = resampled * scale.reshape(3, 1, 1, 1).astype(resampled.dtype)
    else:
        resampled = resampled * torch.as_tensor(scale, dtype=resampled.dtype,
                                                device=resampled.device).view(3, 1, 1, 1)
    return displacement_to_world(resampled, input_affine)
