"""Images in the formats registration users keep them: NIfTI and MGZ through nibabel, anything else SimpleITK reads
(MHA/MHD, NRRD, ...) through SimpleITK.

Whatever the format, an image comes back as the project sees a NIfTI file: an array indexed by the file's voxel
axes (ITK's index i, j, k) and a voxel-to-world affine in RAS mm (utils.itk converts ITK's LPS geometry). Nothing
is reoriented. Every error names the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from utils.io import (PathLike, atomic_write, check_affine, check_gzip, check_voxels, load_nifti, read_nifti_header,
                      save_nifti, spatial_shape)
from utils.itk import affine_from_itk, image_from_array

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MGH_SUFFIXES = (".mgz", ".mgh")
GZIP_SUFFIXES = (".gz", ".mgz")  # gzip streams, whose CRC is checked before their voxels are trusted
GZIP_MAGIC = b"\x1f\x8b"
MIN_OVERLAP = 0.5  # least fraction of the smaller image's world box inside the other's for "affinely pre-aligned"


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return any(path.name.lower().endswith(suffix) for suffix in suffixes)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")


def _open_mgh(path: Path) -> nib.MGHImage:
    _check_exists(path)
    try:
        return nib.MGHImage.from_filename(path)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ValueError(f"cannot read MGH/MGZ file {path}: {exc}") from exc


def _sitk_reader(path: Path) -> sitk.ImageFileReader:
    """A reader whose header has been read and checked: one 3D scalar image."""
    _check_exists(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ValueError(f"cannot read image file {path}: not a format that SimpleITK or nibabel reads, or a "
                         f"corrupt file") from None
    size = reader.GetSize()
    spatial_shape(size, path)
    if reader.GetNumberOfComponents() != 1:
        raise ValueError(f"{path}: expected a scalar image, got {reader.GetNumberOfComponents()} components per "
                         f"voxel")
    return reader


def _itk_affine(image_or_reader) -> np.ndarray:
    """RAS affine of a 3D image or reader (trailing singleton dimensions dropped)."""
    dimension = len(image_or_reader.GetSpacing())
    direction = np.asarray(image_or_reader.GetDirection()).reshape(dimension, dimension)[:3, :3]
    return affine_from_itk(image_or_reader.GetOrigin()[:3], image_or_reader.GetSpacing()[:3], direction.ravel())


def check_integrity(path: PathLike) -> None:
    """Fail, naming the file, when a gzip-compressed image (.nii.gz, .mgz) does not pass its CRC check. A file that
    is missing or no gzip stream at all is left to its reader, which says what it is."""
    path = Path(path)
    if _has_suffix(path, GZIP_SUFFIXES) and path.is_file():
        with open(path, "rb") as handle:
            if handle.read(2) != GZIP_MAGIC:
                return
        check_gzip(path)


def read_image_header(path: PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine (4, 4) RAS mm) of a 3D image file, from its header."""
    path = Path(path)
    if _has_suffix(path, NIFTI_SUFFIXES):
        return read_nifti_header(path)
    if _has_suffix(path, MGH_SUFFIXES):
        image = _open_mgh(path)
        return spatial_shape(image.shape, path), check_affine(np.asarray(image.affine, dtype=np.float64), path)
    reader = _sitk_reader(path)
    return spatial_shape(reader.GetSize(), path), check_affine(_itk_affine(reader), path)


def read_image(path: PathLike, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine (4, 4) RAS mm) of a 3D image file; ``kind`` as in utils.io.load_nifti (image, mask or seg).

    A gzip-compressed file must pass its CRC check first (``check_integrity``)."""
    path = Path(path)
    check_integrity(path)
    if _has_suffix(path, NIFTI_SUFFIXES):
        return load_nifti(path, kind)
    if _has_suffix(path, MGH_SUFFIXES):
        image = _open_mgh(path)
        shape = spatial_shape(image.shape, path)
        try:
            array = image.get_fdata(dtype=np.float32) if kind == "image" else np.asanyarray(image.dataobj)
        except Exception as exc:  # truncated data
            raise ValueError(f"cannot read MGH/MGZ file {path}: {exc}") from exc
        return check_voxels(np.asarray(array).reshape(shape), kind, path), check_affine(
            np.asarray(image.affine, dtype=np.float64), path)
    reader = _sitk_reader(path)
    shape = spatial_shape(reader.GetSize(), path)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise ValueError(f"cannot read image file {path}: the voxel data are truncated or corrupt") from None
    array = sitk.GetArrayFromImage(image).reshape(shape[::-1]).transpose(2, 1, 0)
    return check_voxels(np.ascontiguousarray(array), kind, path), check_affine(_itk_affine(image), path)


def write_image(path: PathLike, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | str) -> Path:
    """Write a 3D array with the grid ``affine`` (RAS) atomically, in the format of the file name's extension."""
    path = Path(path)
    array = np.asarray(array).astype(dtype, copy=False)
    if _has_suffix(path, NIFTI_SUFFIXES):
        save_nifti(path, array, affine, dtype=dtype)
    elif _has_suffix(path, MGH_SUFFIXES):
        with atomic_write(path) as tmp:
            nib.save(nib.MGHImage(array, np.asarray(affine, dtype=np.float64)), tmp)
    else:
        image = image_from_array(array, affine)
        with atomic_write(path) as tmp:
            try:
                sitk.WriteImage(image, str(tmp), useCompression=True)
            except RuntimeError:
                raise ValueError(f"cannot write {path}: SimpleITK has no writer for this extension") from None
    return path


def world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world coordinates (3,), mm, of a grid's field of view (voxel edges, not centres)."""
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = corners @ np.asarray(affine, dtype=np.float64)[:3].T
    return world.min(0), world.max(0)


def world_overlap(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> float:
    """Volume of the intersection of two grids' world boxes over the volume of the smaller box, in [0, 1]."""
    (low_a, high_a), (low_b, high_b) = world_box(shape_a, affine_a), world_box(shape_b, affine_b)
    inside = np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None)
    return float(np.prod(inside) / min(np.prod(high_a - low_a), np.prod(high_b - low_b)))


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray,
              tolerance: float = 1e-3) -> bool:
    """Whether two grids have the same shape and their affines agree to ``tolerance`` (mm)."""
    return (tuple(shape_a) == tuple(shape_b)
            and float(np.abs(np.asarray(affine_a) - np.asarray(affine_b)).max()) <= tolerance)


def resample_to_grid(array: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                     mode: str) -> np.ndarray:
    """``array`` (on the grid of ``affine``) sampled at the voxel centres of the grid (``shape``, ``target_affine``).

    Sampled where the same world point lies: linearly or, with mode 'nearest', at the nearest voxel; zero outside.
    The dtype is kept (nearest-neighbour label ids survive exactly).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    source_from_target = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine,
                                                                                           dtype=np.float64)
    source = array.astype(np.float32) if array.dtype == np.bool_ else array
    resampled = ndimage.affine_transform(source, source_from_target[:3, :3], source_from_target[:3, 3],
                                         output_shape=tuple(int(n) for n in shape), order=1 if mode == "linear" else 0,
                                         mode="constant", cval=0.0)
    return resampled > 0.5 if array.dtype == np.bool_ else resampled
