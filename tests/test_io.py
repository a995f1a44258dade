"""utils.io: atomic writes leave no half files; NIfTI round trips keep values and geometry; bad files fail clearly."""
from __future__ import annotations

import errno
import gzip
import io

import nibabel as nib
import numpy as np
import pytest
import torch

from utils.io import (atomic_torch_save, atomic_write, atomic_write_text, load_nifti, name_problem, read_nifti_header,
                      relative_path_problem, save_nifti)


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, translated affine: a round trip cannot pass by accident."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.25]
    return affine


def write_raw(path, array, affine=None) -> None:
    """Write a NIfTI with nibabel directly (an independent writer for load tests)."""
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


# ---------------------------------------------------------------- names and paths
@pytest.mark.parametrize("name, ok", [("sub-01", True), ("my run", True), ("a..b", True), ("", False), ("  ", False),
                                      ("..", False), (".", False), (".tmp-x", False), ("a/b", False),
                                      ("../x", False), ("a\\b", False), ("a\0b", False)])
def test_name_problem(name, ok):
    assert (name_problem(name) is None) is ok


@pytest.mark.parametrize("path, ok", [("im.nii.gz", True), ("anat/im.nii.gz", True), ("a..b.nii", True),
                                      ("../im.nii.gz", False), ("anat/../../im.nii.gz", False), ("/etc/x", False),
                                      ("C:/x", False), ("..\\x", False), ("", False)])
def test_relative_path_problem(path, ok):
    assert (relative_path_problem(path) is None) is ok


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "dir" / "file.txt"  # parents are created
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible before the body ends
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_write_keeps_old_file_when_body_raises(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # the temporary file is gone


def test_atomic_write_text_and_torch_save(tmp_path):
    atomic_write_text(tmp_path / "a.json", '{"x": 1}')
    assert (tmp_path / "a.json").read_text() == '{"x": 1}'
    state = {"weights": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    atomic_torch_save(state, tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], state["weights"])


class _FullDisk(io.FileIO):
    """A file on a full disk: every write fails with ENOSPC."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_target_and_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr("utils.io.open", _FullDisk, raising=False)
    with pytest.raises(OSError) as error:
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "out" / "state.pt")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "out" / "state.pt")
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_torch_save_keeps_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_torch_save({"epoch": 1}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: None}, target)  # a lambda cannot be pickled
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- NIfTI round trips

@pytest.mark.parametrize("filename", ["x.nii.gz", "x.nii"])
def test_image_round_trip_keeps_values_and_affine(tmp_path, filename):
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    affine = oblique_affine()
    save_nifti(tmp_path / filename, array, affine)
    loaded, loaded_affine = load_nifti(tmp_path / filename, "image")
    assert loaded.dtype == np.float32 and loaded.shape == (5, 6, 7)
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)
    header = nib.load(tmp_path / filename).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-5)


def test_label_round_trip_is_exact(tmp_path):
    seg = np.array([0, 2, 41, 10, 49, 1000, 2035, 16] * 8).reshape(4, 4, 4).astype(np.int64)
    save_nifti(tmp_path / "seg.nii.gz", seg, np.eye(4))
    loaded, _ = load_nifti(tmp_path / "seg.nii.gz", "seg")
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, seg)
    save_nifti(tmp_path / "mask.nii.gz", seg > 10, np.eye(4))
    mask, _ = load_nifti(tmp_path / "mask.nii.gz", "mask")
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, seg > 10)


def test_torch_inputs_and_explicit_dtype(tmp_path):
    save_nifti(tmp_path / "x.nii.gz", torch.ones(3, 3, 3), torch.eye(4, dtype=torch.float64), dtype=np.int16)
    assert nib.load(tmp_path / "x.nii.gz").get_data_dtype() == np.int16


@pytest.mark.parametrize("array, dtype, stored", [
    (np.ones((2, 2, 2), dtype=bool), None, np.uint8),
    (np.ones((2, 2, 2), dtype=np.int64), None, np.int32),
    (np.ones((2, 2, 2), dtype=np.int64), np.int64, np.int64),
    (np.ones((2, 2, 2), dtype=np.float32), None, np.float32),
    (np.ones((2, 2, 2), dtype=np.float64), np.float32, np.float32),
])
def test_storage_dtype(tmp_path, array, dtype, stored):
    save_nifti(tmp_path / "x.nii.gz", array, np.eye(4), dtype=dtype)
    img = nib.load(tmp_path / "x.nii.gz")
    assert img.get_data_dtype() == stored
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), array)


def test_int64_out_of_int32_range_needs_explicit_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"x\.nii\.gz.*int32"):
        save_nifti(tmp_path / "x.nii.gz", np.full((2, 2, 2), 2 ** 40), np.eye(4))
    assert not (tmp_path / "x.nii.gz").exists()


def test_vector_image_is_5d_with_vector_intent(tmp_path):
    field = np.random.default_rng(1).standard_normal((4, 5, 6, 3)).astype(np.float32)
    affine = oblique_affine()
    save_nifti(tmp_path / "disp.nii.gz", field, affine)
    img = nib.load(tmp_path / "disp.nii.gz")
    assert img.shape == (4, 5, 6, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[:, :, :, 0, :], field)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)


def test_orientation_is_never_changed(tmp_path):
    # a left-right flipped (LAS) affine must come back as stored, with the array untouched
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_raw(tmp_path / "las.nii.gz", array, affine)
    loaded, loaded_affine = load_nifti(tmp_path / "las.nii.gz", "image")
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_array_equal(loaded_affine, affine)


def test_singleton_4d_is_squeezed(tmp_path):
    array = np.random.default_rng(2).random((4, 5, 6, 1)).astype(np.float32)
    write_raw(tmp_path / "x.nii.gz", array)
    loaded, _ = load_nifti(tmp_path / "x.nii.gz", "image")
    assert loaded.shape == (4, 5, 6)
    assert read_nifti_header(tmp_path / "x.nii.gz")[0] == (4, 5, 6)


def test_scaled_labels_are_read_exactly(tmp_path):
    # labels stored with a scale factor come back as the scaled integers (no float rounding surprises)
    img = nib.Nifti1Image(np.array([0, 1, 2, 3] * 16, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    img.header.set_slope_inter(10.0, 0.0)
    nib.save(img, tmp_path / "seg.nii.gz")
    loaded, _ = load_nifti(tmp_path / "seg.nii.gz", "seg")
    assert set(np.unique(loaded)) == {0, 10, 20, 30}


# ---------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_nifti(tmp_path / "nope.nii.gz", "image")


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, np.random.default_rng(3).bytes(2000)])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*x\.nii\.gz"):
        load_nifti(path, "image")


def test_truncated_data(tmp_path):
    path = tmp_path / "x.nii.gz"
    write_raw(path, np.random.default_rng(4).random((20, 20, 20)).astype(np.float32))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid header, half the voxels
    with pytest.raises(ValueError, match=r"x\.nii\.gz: the header declares \(20, 20, 20\) voxels of float32 "
                                         r"\(32352 bytes with the header\), but the file holds 16176"):
        load_nifti(path, "image")


def test_not_nifti(tmp_path):
    path = tmp_path / "x.mgz"
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"x\.mgz.*not NIfTI"):
        load_nifti(path, "image")


@pytest.mark.parametrize("shape", [(4, 5, 6, 2), (4, 5), (4, 5, 6, 1, 3)])
def test_not_3d(tmp_path, shape):
    write_raw(tmp_path / "x.nii.gz", np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=r"x\.nii\.gz.*3D"):
        load_nifti(tmp_path / "x.nii.gz", "image")
    with pytest.raises(ValueError, match=r"x\.nii\.gz.*3D"):
        read_nifti_header(tmp_path / "x.nii.gz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(tmp_path, bad):
    array = np.ones((4, 4, 4), dtype=np.float32)
    array[1, 2, 3] = bad
    write_raw(tmp_path / "x.nii.gz", array)
    with pytest.raises(ValueError, match=r"x\.nii\.gz.*NaN or Inf"):
        load_nifti(tmp_path / "x.nii.gz", "image")


@pytest.mark.parametrize("kind", ["mask", "seg"])
@pytest.mark.parametrize("bad", [0.5, np.nan])
def test_non_integer_labels(tmp_path, kind, bad):
    array = np.ones((4, 4, 4), dtype=np.float32)
    array[0, 0, 0] = bad
    write_raw(tmp_path / "lab.nii.gz", array)
    with pytest.raises(ValueError, match=rf"lab\.nii\.gz.*{kind}.*integer"):
        load_nifti(tmp_path / "lab.nii.gz", kind)


def test_float_stored_integer_labels_are_accepted(tmp_path):
    write_raw(tmp_path / "seg.nii.gz", np.full((3, 3, 3), 17.0, dtype=np.float32))
    seg, _ = load_nifti(tmp_path / "seg.nii.gz", "seg")
    assert seg.dtype == np.int64 and (seg == 17).all()


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_nifti(tmp_path / "x.nii.gz", "label")
