"""data_loader.images: every format reads as nibabel reads the same NIfTI file; world overlap and world-space
resampling against analytic answers; a dataset of .mha files loads as the NIfTI one."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_loader.dataset import PairDataset
from data_loader.images import read_image, read_image_header, resample_to_grid, world_overlap, write_image
from tests.image_files import AFFINE, converted, nifti, sitk_array

SHAPE = (10, 12, 8)


@pytest.fixture
def seg_nii(tmp_path) -> Path:
    labels = np.random.default_rng(0).integers(0, 5, SHAPE).astype(np.int16) * 10
    return nifti(tmp_path / "seg.nii.gz", labels)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii", ".mgz"])
def test_formats_read_as_nibabel_reads_the_nifti(seg_nii, suffix):
    if suffix == ".mgz":
        path = seg_nii.with_name("seg.mgz")
        nib.save(nib.MGHImage(np.asanyarray(nib.load(seg_nii).dataobj).astype(np.int32), AFFINE), path)
    else:
        path = converted(seg_nii, suffix)
    array, affine = read_image(path, "seg")
    np.testing.assert_array_equal(array, np.asanyarray(nib.load(seg_nii).dataobj))
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)
    assert read_image_header(path)[0] == SHAPE
    np.testing.assert_allclose(read_image_header(path)[1], AFFINE, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mgz", ".nii.gz"])
def test_written_images_read_back(tmp_path, suffix):
    array = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    path = write_image(tmp_path / f"out{suffix}", array, AFFINE, np.float32)
    read, affine = read_image(path, "image")
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)
    if suffix != ".mgz":
        np.testing.assert_array_equal(sitk_array(path), array)  # and ITK reads the same voxels


def test_unreadable_files_fail_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "none.nrrd", "image")
    (tmp_path / "junk.mha").write_text("junk")
    with pytest.raises(ValueError, match=f"cannot read image file {tmp_path / 'junk.mha'}"):
        read_image_header(tmp_path / "junk.mha")
    (tmp_path / "junk.mgz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read MGH/MGZ file"):
        read_image(tmp_path / "junk.mgz", "image")
    four_d = converted(nifti(tmp_path / "t.nii.gz", np.zeros((*SHAPE, 2), dtype=np.float32)), ".nrrd")
    with pytest.raises(ValueError, match="expected a 3D image"):
        read_image_header(four_d)
    vector = sitk.GetImageFromArray(np.zeros((*SHAPE, 3), dtype=np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(ValueError, match="expected a scalar image, got 3 components"):
        read_image(tmp_path / "vector.mha", "image")


def test_world_overlap():
    shifted = AFFINE.copy()
    shifted[:3, 3] += AFFINE[:3, :3] @ np.array([SHAPE[0] / 2, 0.0, 0.0])  # half the field of view along axis 0
    assert world_overlap(SHAPE, AFFINE, SHAPE, AFFINE) == pytest.approx(1.0)
    assert world_overlap(SHAPE, AFFINE, SHAPE, shifted) == pytest.approx(0.5)
    shifted[:3, 3] += 1000.0
    assert world_overlap(SHAPE, AFFINE, SHAPE, shifted) == 0.0
    inner = AFFINE.copy()
    inner[:3, 3] += AFFINE[:3, :3] @ np.array([2.0, 2.0, 2.0])
    assert world_overlap(SHAPE, AFFINE, (4, 4, 4), inner) == pytest.approx(1.0)  # inside the other one


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resampling_to_a_shifted_grid_is_a_shift(seg_nii, mode):
    """A grid starting 3 voxels later along axis 1 sees the array from index 3 on, and zeros beyond its end."""
    labels = np.asanyarray(nib.load(seg_nii).dataobj).astype(np.int64)
    array = labels.astype(np.float32) if mode == "linear" else labels
    target = AFFINE.copy()
    target[:3, 3] += AFFINE[:3, :3] @ np.array([0.0, 3.0, 0.0])
    resampled = resample_to_grid(array, AFFINE, SHAPE, target, mode)
    assert resampled.dtype == array.dtype
    np.testing.assert_allclose(resampled[:, :-3], array[:, 3:], atol=1e-5)
    assert not resampled[:, -2:].any()


def test_dataset_of_mha_files_loads_as_the_nifti_one(tmp_path):
    rng = np.random.default_rng(2)
    for subject in ("A", "B"):
        (tmp_path / subject).mkdir()
        arrays = {"im": rng.random(SHAPE).astype(np.float32) * 100, "mask": np.ones(SHAPE, dtype=np.uint8),
                  "seg": rng.integers(0, 3, SHAPE).astype(np.int16)}
        for kind, array in arrays.items():
            converted(nifti(tmp_path / subject / f"{kind}.nii.gz", array), ".mha")
    (tmp_path / "pairs.csv").write_text("A,B\n")
    items = [PairDataset(tmp_path, "pairs.csv", (8, 8, 8), f"im{suffix}", f"mask{suffix}", f"seg{suffix}")[0]
             for suffix in (".nii.gz", ".mha")]
    for side in ("fixed", "moving"):
        for key in ("im", "mask", "seg"):
            np.testing.assert_allclose(items[1][side][key].numpy(), items[0][side][key].numpy(), atol=1e-6)
    np.testing.assert_allclose(items[1]["input_affine"].numpy(), AFFINE, atol=1e-5)
