"""utils.itk: the project's RAS affines against ITK's own reading of the same NIfTI file, and displacement fields
that SimpleITK applies as the world displacement they were made from."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tests.image_files import AFFINE, nifti, sitk_array
from utils.itk import (affine_from_itk, array_from_image, image_from_array, itk_from_affine,
                       read_displacement_transform, resample, write_itk_displacement)

SHAPE = (6, 7, 8)


def test_geometry_is_what_itk_reads_from_the_nifti(tmp_path):
    path = nifti(tmp_path / "im.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    image = sitk.ReadImage(str(path))
    origin, spacing, direction = itk_from_affine(AFFINE)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection()),
                               AFFINE, atol=1e-5)


def test_arrays_keep_their_index_order(tmp_path):
    array = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    image = image_from_array(array, AFFINE)
    assert image.GetSize() == SHAPE
    np.testing.assert_array_equal(array_from_image(image), array)
    sitk.WriteImage(image, str(tmp_path / "im.mha"))
    np.testing.assert_array_equal(sitk_array(tmp_path / "im.mha"), array)


def test_sheared_affine_is_refused():
    sheared = AFFINE.copy()
    sheared[0, 0] = 0.5
    with pytest.raises(ValueError, match="shear"):
        itk_from_affine(sheared)


@pytest.mark.parametrize("labels", [False, True])
def test_field_of_a_world_translation_shifts_the_array(tmp_path, labels):
    """A constant displacement of -3 mm along world x is +2 voxels along array axis 2 (AFFINE: axis 2 -> -1.5 x)."""
    rng = np.random.default_rng(1)
    array = rng.integers(0, 9, SHAPE) if labels else rng.random(SHAPE).astype(np.float32)
    field = np.zeros((3, *SHAPE))
    field[0] = -3.0  # mm, RAS world x
    write_itk_displacement(tmp_path / "t.nii.gz", field, AFFINE)
    image = image_from_array(array, AFFINE)
    result = array_from_image(resample(image, image, read_displacement_transform(tmp_path / "t.nii.gz"), labels))
    np.testing.assert_allclose(result[:, :, :6], array[:, :, 2:], atol=1e-6)
    np.testing.assert_array_equal(result[:, :, 6:], 0)  # mapped outside the image


def test_field_file_is_a_vector_nifti_with_lps_vectors(tmp_path):
    """ANTs' warp layout: 5D (X, Y, Z, 1, 3), intent vector, vectors in LPS on the fixed grid."""
    field = np.random.default_rng(2).normal(size=(3, *SHAPE))
    write_itk_displacement(tmp_path / "t.nii.gz", field, AFFINE)
    stored = nib.load(tmp_path / "t.nii.gz")
    assert stored.shape == (*SHAPE, 1, 3) and stored.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(stored.affine, AFFINE, atol=1e-5)
    expected = np.moveaxis(field * np.array([-1.0, -1.0, 1.0]).reshape(3, 1, 1, 1), 0, -1)
    np.testing.assert_allclose(np.asanyarray(stored.dataobj)[:, :, :, 0], expected, atol=1e-6)


def test_only_displacement_fields_are_transforms(tmp_path):
    with pytest.raises(FileNotFoundError, match="transform file not found"):
        read_displacement_transform(tmp_path / "none.nii.gz")
    scalar = nifti(tmp_path / "scalar.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    with pytest.raises(ValueError, match="3 components per voxel"):
        read_displacement_transform(scalar)
    (tmp_path / "junk.mha").write_text("junk")
    with pytest.raises(ValueError, match="cannot read transform file"):
        read_displacement_transform(tmp_path / "junk.mha")
