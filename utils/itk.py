"""ITK's conventions: image geometry in LPS physical space, and displacement-field transforms other tools apply.

The project's affines are voxel-to-world maps in NIfTI's RAS convention (nibabel's ``affine``: world axis x
points to the subject's left-to-right, y posterior-to-anterior, z inferior-to-superior), with the array axes in the
order of ITK's index (i, j, k). ITK (SimpleITK, ANTs) describes the same grid by origin, spacing and direction in
LPS physical space: x right-to-left, y anterior-to-posterior, z inferior-to-superior. The two differ by flipping
the signs of x and y, for points and vectors alike.

An ITK displacement field transform T(p) = p + d(p) maps a point p of the output (fixed) grid, in LPS mm, to the
point of the input (moving) image that is sampled there: exactly what ``displacement.nii.gz`` says in RAS.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from utils.io import PathLike, atomic_write, check_gzip

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse: also RAS from LPS
DIRECTION_TOLERANCE = 1e-4  # largest deviation from an orthonormal direction matrix that ITK can represent


def affine_from_itk(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Voxel-to-world affine (4, 4), RAS mm, of an ITK grid: origin (3,), spacing (3,), direction (9,) row-major,
    all in ITK's LPS convention."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_FROM_RAS @ matrix
    affine[:3, 3] = LPS_FROM_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def itk_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) in ITK's LPS convention of a voxel-to-world affine (4, 4), RAS mm.

    ITK grids have orthonormal directions: an affine with shear cannot be written as one (ValueError).
    """
    affine = np.asarray(affine, dtype=np.float64)
    matrix = LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(spacing > 0):
        raise ValueError(f"affine has a zero-length voxel axis: {affine[:3, :3].tolist()}")
    direction = matrix / spacing
    deviation = np.abs(direction.T @ direction - np.eye(3)).max()
    if deviation > DIRECTION_TOLERANCE:
        raise ValueError(f"affine has shear (direction deviates from orthonormal by {deviation:.2g}): ITK grids "
                         f"cannot represent it")
    origin = LPS_FROM_RAS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def image_from_array(array: np.ndarray, affine: np.ndarray, is_vector: bool = False) -> sitk.Image:
    """A SimpleITK image of ``array`` (X, Y, Z) or, with ``is_vector``, (X, Y, Z, C) on the grid of ``affine`` (RAS).

    SimpleITK arrays are indexed (k, j, i): the spatial axes are reversed, the components stay last.
    """
    array = np.asarray(array)
    order = (2, 1, 0, 3) if is_vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=is_vector)
    origin, spacing, direction = itk_from_affine(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def array_from_image(image: sitk.Image) -> np.ndarray:
    """The voxels of a scalar SimpleITK image as an array indexed (i, j, k), the project's array axes."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def itk_displacement_field(displacement: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """ITK displacement field (vector image, LPS mm) of a displacement (3, X, Y, Z), mm along the RAS world axes.

    The field lives on the grid of ``affine`` (the fixed image's): voxel (i, j, k) holds d(p), p that voxel's
    centre, so that ``SimpleITK.DisplacementFieldTransform`` and ``antsApplyTransforms`` map p to p + d(p).
    """
    displacement = np.asarray(displacement, dtype=np.float64)
    if displacement.ndim != 4 or displacement.shape[0] != 3:
        raise ValueError(f"expected a displacement (3, X, Y, Z), got shape {displacement.shape}")
    lps = np.einsum("kj,j...->...k", LPS_FROM_RAS, displacement)
    return image_from_array(lps, affine, is_vector=True)


def write_itk_displacement(path: PathLike, displacement: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``itk_displacement_field`` atomically, float32 (NIfTI: 5D, intent "vector", ANTs' warp layout)."""
    return write_sitk(path, sitk.Cast(itk_displacement_field(displacement, affine), sitk.sitkVectorFloat32))


NIFTI_VOXEL_OFFSET = 352  # the least header size of a single-file NIfTI (348 bytes and the extension flags)


def write_sitk(path: PathLike, image: sitk.Image) -> Path:
    """Write a SimpleITK image atomically (compressed where the format allows).

    SimpleITK's NIfTI writer only prints a message when a write fails (a full disk) and leaves a short file, so a
    NIfTI file is read back to check that it holds every voxel; an incomplete one fails, naming ``path`` (as no space
    left on device when the disk lacks the room for the rest).
    """
    path = Path(path)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        name = tmp.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            expected = NIFTI_VOXEL_OFFSET + (image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel()
                                             * image.GetSizeOfPixelComponent())
            try:
                length = check_gzip(tmp) if name.endswith(".gz") else tmp.stat().st_size
            except ValueError:
                length = 0
            if length < expected:
                if shutil.disk_usage(tmp.parent).free < expected - length:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
                raise OSError(errno.EIO, "the image file was written incompletely", str(tmp))
    return path


def read_displacement_transform(path: PathLike) -> sitk.DisplacementFieldTransform:
    """The transform of an ITK displacement field file (written here, or an ANTs warp); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transform file not found: {path}")
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ValueError(f"cannot read transform file {path}: not an image SimpleITK can read") from None
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"{path}: expected a 3D displacement field with 3 components per voxel, got a "
                         f"{field.GetDimension()}D image with {field.GetNumberOfComponentsPerPixel()} component(s)")
    if not np.isfinite(sitk.GetArrayViewFromImage(field)).all():
        raise ValueError(f"{path}: the displacement field holds NaN or infinite values, it is not a transform")
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, labels: bool) -> sitk.Image:
    """``image`` sampled at T(p) for every voxel centre p of ``reference``: linear, or nearest neighbour for labels.

    Points that T maps outside ``image`` get 0, as in ITK's and ANTs' resamplers.
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, 0.0,
                         image.GetPixelID() if labels else sitk.sitkFloat32)
