"""Image files for the format and geometry tests, written by nibabel and converted by SimpleITK itself, so that the
checks do not rely on the project's own conversions."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# array axis 0 -> world +y (1.2 mm), axis 1 -> world +z (2.0 mm), axis 2 -> world -x (1.5 mm): rotated, flipped,
# anisotropic, so that any slip between RAS and LPS, or between array and ITK index order, shows
AFFINE = np.array([[0.0, 0.0, -1.5, 12.0],
                   [1.2, 0.0, 0.0, -11.0],
                   [0.0, 2.0, 0.0, -14.0],
                   [0.0, 0.0, 0.0, 1.0]])


def nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write with nibabel alone (independent of utils.io)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def converted(nii: Path, suffix: str) -> Path:
    """The NIfTI file converted by SimpleITK (ITK's own RAS -> LPS reading) to another format."""
    image = sitk.ReadImage(str(nii))
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    path = nii.with_name(nii.name.replace(".nii.gz", suffix))
    sitk.WriteImage(image, str(path))
    return path


def sitk_array(path: Path) -> np.ndarray:
    """The voxels of an image file as SimpleITK reads them, indexed (i, j, k) like nibabel's arrays."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
