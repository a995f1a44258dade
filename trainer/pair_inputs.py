"""The inputs of one registration: images given as files, SimpleITK images or arrays with an affine, checked and
brought onto the working grid."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from data_loader.dataset import working_image
from data_loader.geometry import resample_to_working
from data_loader.images import MIN_OVERLAP, read_image, same_grid, world_overlap
from utils.io import check_voxels
from utils.itk import affine_from_itk, array_from_image, image_from_array

# a file (NIfTI, MHA/MHD, NRRD, MGZ, ...), a SimpleITK image, or (array (X, Y, Z), voxel-to-world affine (4, 4), RAS mm)
ImageInput = Union[str, os.PathLike, sitk.Image, tuple[np.ndarray, np.ndarray]]
PIXEL_TYPES = {"image": sitk.sitkFloat32, "mask": sitk.sitkUInt8, "seg": sitk.sitkInt32}


def affine_of(image: sitk.Image) -> np.ndarray:
    """Voxel-to-world affine (4, 4), RAS mm, of a 3D SimpleITK image."""
    return affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def describe(value: ImageInput | None) -> str:
    """How an input is named in messages: its path, or what it is."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return "a SimpleITK image" if isinstance(value, sitk.Image) else "an array"


def load_input(value: ImageInput, kind: str, name: str) -> sitk.Image:
    """A registration input as a SimpleITK image of ``kind`` (image: float32, mask: uint8 of 0/1, seg: int32).

    Files are read as ``data_loader.images.read_image`` reads them; arrays are indexed (i, j, k) like nibabel's;
    voxels are checked (finite image, integer labels). Errors name ``name`` and the file.
    """
    where = f"{name} ({describe(value)})"
    if isinstance(value, sitk.Image):
        if value.GetDimension() != 3 or value.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{where}: expected a 3D scalar image, got {value.GetDimension()}D with "
                             f"{value.GetNumberOfComponentsPerPixel()} component(s)")
        array, affine = array_from_image(value), affine_of(value)
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"{name}: expected (array, affine), got a tuple of {len(value)}")
        array, affine = np.asarray(value[0]), np.asarray(value[1], dtype=np.float64)
        if array.ndim != 3 or affine.shape != (4, 4):
            raise ValueError(f"{name}: expected a 3D array and a (4, 4) affine, got shapes {array.shape} and "
                             f"{affine.shape}")
    else:
        array, affine = read_image(value, kind)
    array = check_voxels(array, kind, where)
    try:
        return image_from_array(array.astype(np.float32 if kind == "image" else np.int32), affine) \
            if kind != "mask" else sitk.Cast(image_from_array(array.astype(np.uint8), affine), PIXEL_TYPES[kind])
    except ValueError as error:  # an affine with shear: no ITK grid
        raise ValueError(f"{where}: {error}") from None


@dataclass
class PairInputs:
    """The images of one registration as SimpleITK images; mask and segmentations optional."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None = None
    fixed_seg: sitk.Image | None = None
    moving_seg: sitk.Image | None = None

    @classmethod
    def load(cls, fixed: ImageInput, moving: ImageInput, fixed_mask: ImageInput | None = None,
             fixed_seg: ImageInput | None = None, moving_seg: ImageInput | None = None) -> "PairInputs":
        """Read and check every input: 3D scalar images, and a mask or segmentation on the grid of its image."""
        inputs = cls(load_input(fixed, "image", "fixed image"), load_input(moving, "image", "moving image"))
        for attribute, value, kind, image, image_value in (
                ("fixed_mask", fixed_mask, "mask", inputs.fixed, fixed),
                ("fixed_seg", fixed_seg, "seg", inputs.fixed, fixed),
                ("moving_seg", moving_seg, "seg", inputs.moving, moving)):
            if value is None:
                continue
            loaded = load_input(value, kind, attribute.replace("_", " "))
            if not same_grid(loaded.GetSize(), affine_of(loaded), image.GetSize(), affine_of(image)):
                what = attribute.replace("_", " ")
                raise ValueError(f"{describe(value)}: {what} grid (shape {loaded.GetSize()}, affine "
                                 f"{_short(affine_of(loaded))}) does not match its image {describe(image_value)} "
                                 f"(shape {image.GetSize()}, affine {_short(affine_of(image))})")
            setattr(inputs, attribute, loaded)
        return inputs

    @property
    def shape(self) -> tuple[int, int, int]:
        """The fixed image's grid shape (X, Y, Z)."""
        return tuple(int(n) for n in self.fixed.GetSize())

    @property
    def affine(self) -> np.ndarray:
        """The fixed image's voxel-to-world affine (4, 4), RAS mm."""
        return affine_of(self.fixed)

    def check_overlap(self, fixed_name: str, moving_name: str) -> None:
        """Fail unless the images overlap in world space, as affinely pre-aligned images do."""
        overlap = world_overlap(self.shape, self.affine, self.moving.GetSize(), affine_of(self.moving))
        if overlap < MIN_OVERLAP:
            raise ValueError(f"{moving_name} and {fixed_name} barely overlap in world space ({overlap:.0%} of the "
                             f"smaller field of view, at least {MIN_OVERLAP:.0%} needed): without the affine step "
                             f"(--affine none) the images must be affinely pre-aligned")

    def resampled_moving(self, transform: sitk.Transform) -> np.ndarray:
        """The moving image through ``transform`` (fixed -> moving points) on the fixed grid, linear, 0 outside;
        an array (X, Y, Z)."""
        return array_from_image(sitk.Resample(self.moving, self.fixed, transform, sitk.sitkLinear, 0.0,
                                              sitk.sitkFloat32))

    def working(self, transform: sitk.Transform, dims: Sequence[int], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed image, moving image through ``transform`` and fixed mask on the working grid ``dims``, each
        (1, 1, *dims) float32 on ``device``: images min-max rescaled to [0, 1] after the resize, the mask all ones
        without a mask."""
        fixed = working_image(array_from_image(self.fixed), self.shape, dims, "fixed image")
        moving = working_image(self.resampled_moving(transform), self.shape, dims,
                               "moving image (after the affine step)")
        if self.fixed_mask is None:
            mask = np.ones(tuple(dims), dtype=np.float32)
        else:
            mask = resample_to_working(array_from_image(self.fixed_mask) > 0, self.shape, dims, "nearest")
        return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device)
                     for x in (fixed, moving, mask))


def _short(affine: np.ndarray) -> str:
    """An affine on one line."""
    return np.array2string(np.asarray(affine)[:3], precision=3, separator=",").replace("\n", "")


def image_like(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """``array`` (X, Y, Z) or (X, Y, Z, C) as a SimpleITK image on the grid of ``reference``."""
    return image_from_array(array, affine_of(reference), is_vector=is_vector)
