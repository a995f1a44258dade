"""data_loader.dataset: items have the promised shapes, ranges and geometry; bad inputs fail early and clearly."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data_loader.dataset as dataset_module
from data_loader.dataset import DEFAULT_LABELS, PairDataset, load_labels
from data_loader.demo import make_demo_dataset
from data_loader.geometry import resample_to_working, working_affine
from utils.io import load_nifti, save_nifti

SYNTHBRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthbrain"
DEMO_SIZE = 16
SHAPE = (10, 12, 8)
AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.5, -9], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", no_subjects=4, size=DEMO_SIZE, seed=0)


def write_subject(root: Path, subject: str, im=None, mask=None, seg=None, affine=AFFINE) -> Path:
    """A small valid subject (non-cubic), with any of its arrays replaced; ``False`` skips a file."""
    rng = np.random.default_rng(sum(map(ord, subject)))
    folder = root / subject
    arrays = {
        "im.nii.gz": rng.random(SHAPE).astype(np.float32) * 200 + 50 if im is None else im,
        "mask.nii.gz": np.ones(SHAPE, dtype=np.uint8) if mask is None else mask,
        "seg.nii.gz": rng.integers(0, 3, SHAPE).astype(np.int16) * 10 if seg is None else seg,
    }
    for name, array in arrays.items():
        if array is not False:
            save_nifti(folder / name, array, affine)
    return folder


def write_pairs(root: Path, text: str, name: str = "pairs.csv") -> Path:
    (root / name).write_text(text)
    return root / name


@pytest.fixture
def small(tmp_path) -> Path:
    """A valid non-cubic dataset: atlas A and moving B, C."""
    for subject in "ABC":
        write_subject(tmp_path, subject)
    write_pairs(tmp_path, "A,B\nA,C\n")
    return tmp_path


# ---------------------------------------------------------------- items on the demo data

def test_items_on_demo_data(demo):
    data = PairDataset(demo, "pairs.csv", (DEMO_SIZE,) * 3)
    assert len(data) == 3
    item = data[1]
    assert (item["fixed_id"], item["moving_id"], item["pair_id"], item["index"]) == ("sub-01", "sub-03",
                                                                                     "sub-01_sub-03", 1)
    for side, subject in (("fixed", "sub-01"), ("moving", "sub-03")):
        images = item[side]
        assert set(images) == {"im", "mask", "seg"}
        assert images["im"].shape == images["mask"].shape == images["seg"].shape == (1,) + (DEMO_SIZE,) * 3
        assert images["im"].dtype == torch.float32 and images["mask"].dtype == torch.float32
        assert images["seg"].dtype == torch.int64
        assert images["im"].min() == 0.0 and images["im"].max() == 1.0
        assert set(images["mask"].unique().tolist()) == {0.0, 1.0}
        # dims == input shape: the voxels are the file's (rescaled), labels exactly preserved
        seg, _ = load_nifti(demo / subject / "seg.nii.gz", "seg")
        np.testing.assert_array_equal(images["seg"][0].numpy(), seg)
        im, _ = load_nifti(demo / subject / "im.nii.gz", "image")
        np.testing.assert_allclose(images["im"][0].numpy(), (im - im.min()) / (im.max() - im.min()), atol=1e-6)
    _, affine = load_nifti(demo / "sub-01" / "im.nii.gz", "image")
    assert item["affine"].dtype == torch.float64 and item["input_affine"].dtype == torch.float64
    np.testing.assert_allclose(item["affine"].numpy(), affine)
    np.testing.assert_allclose(item["input_affine"].numpy(), affine)
    assert item["input_shape"].dtype == torch.int64 and item["input_shape"].tolist() == [DEMO_SIZE] * 3
    assert data[-1]["pair_id"] == "sub-01_sub-04"
    with pytest.raises(IndexError):
        data[3]


def test_default_collate(demo):
    loader = DataLoader(PairDataset(demo, "pairs.csv", (DEMO_SIZE,) * 3), batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["fixed"]["im"].shape == (2, 1) + (DEMO_SIZE,) * 3
    assert batch["moving"]["seg"].shape == (2, 1) + (DEMO_SIZE,) * 3
    assert batch["pair_id"] == ["sub-01_sub-02", "sub-01_sub-03"]
    assert batch["index"].tolist() == [0, 1]
    assert batch["affine"].shape == (2, 4, 4) and batch["input_shape"].shape == (2, 3)


def test_resampling_to_other_dims_keeps_labels_and_geometry(demo):
    dims = (24, 20, 12)
    data = PairDataset(demo, "pairs.csv", dims)
    item = data[0]
    assert item["fixed"]["im"].shape == (1, *dims)
    seg, affine = load_nifti(demo / "sub-01" / "seg.nii.gz", "seg")
    assert set(item["fixed"]["seg"].unique().tolist()) <= set(np.unique(seg).tolist())
    np.testing.assert_allclose(item["affine"].numpy(), working_affine(affine, seg.shape, dims))
    expected = resample_to_working(seg, seg.shape, dims, "nearest")
    np.testing.assert_array_equal(item["fixed"]["seg"][0].numpy(), expected)
    assert 0.0 <= item["moving"]["im"].min() and item["moving"]["im"].max() <= 1.0


def test_rescaling_happens_after_resampling(small):
    """The reference pads and resizes first, then min-max rescales: the zero padding of the cube becomes 0."""
    im = np.full(SHAPE, 100.0, dtype=np.float32)
    im[3:7, 4:8, 2:6] = 300.0
    write_subject(small, "A", im=im)
    data = PairDataset(small, "pairs.csv", (16, 16, 16))
    fixed = data[0]["fixed"]["im"]
    working = resample_to_working(im, SHAPE, (16, 16, 16), "linear")
    assert working.min() == 0.0  # the padding: rescaling before resampling would have mapped 100 to 0 instead
    expected = (working - working.min()) / (working.max() - working.min())
    np.testing.assert_allclose(fixed[0].numpy(), expected, atol=1e-6)
    assert fixed.min() == 0.0 and fixed.max() == pytest.approx(1.0)
    inside = np.isclose(working, 100.0)  # voxels of value 100: 1/3 of the way from the padding's 0 to 300
    assert inside.any() and np.allclose(fixed[0].numpy()[inside], 1.0 / 3.0, atol=1e-6)


def test_optional_mask_and_seg(small):
    data = PairDataset(small, "pairs.csv", SHAPE, mask_filename=None, seg_filename=None)
    item = data[0]
    assert set(item["fixed"]) == {"im", "mask"}
    assert torch.equal(item["fixed"]["mask"], torch.ones(1, *SHAPE))


def test_absolute_pairs_file_blank_lines_and_spaces(small, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("pairs")
    pairs = write_pairs(elsewhere, "\n  A , B \n\nA,C\n   \n")
    data = PairDataset(small, pairs, SHAPE)
    assert data.pairs == [("A", "B"), ("A", "C")]


def test_subjects_are_cached_and_items_are_independent(small, monkeypatch):
    calls = []
    real = dataset_module.read_image
    monkeypatch.setattr(dataset_module, "read_image", lambda path, kind: calls.append(path) or real(path, kind))
    data = PairDataset(small, "pairs.csv", SHAPE)
    first = data[0]
    first["fixed"]["im"].zero_()  # a caller modifying its item in place ...
    second = data[1]
    assert second["fixed"]["im"].max() == 1.0  # ... does not corrupt the cached atlas
    assert sum(Path(p).parent.name == "A" for p in calls) == 3  # the atlas' im, mask, seg read once


# ---------------------------------------------------------------- errors at construction

def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        PairDataset(tmp_path / "nowhere", "pairs.csv", SHAPE)


def test_missing_pairs_file(small):
    with pytest.raises(FileNotFoundError, match=re.escape(str(small / "other.csv"))):
        PairDataset(small, "other.csv", SHAPE)


@pytest.mark.parametrize("bad_line", ["A", "A,B,C", "A,", ",B", "A;B"])
def test_malformed_pairs_line(small, bad_line):
    write_pairs(small, f"A,B\n\nA,C\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"pairs\.csv, line 4: .*{re.escape(repr(bad_line))}"):
        PairDataset(small, "pairs.csv", SHAPE)


def test_empty_pairs_file(small):
    write_pairs(small, "\n \n")
    with pytest.raises(ValueError, match="no pairs"):
        PairDataset(small, "pairs.csv", SHAPE)


def test_every_missing_path_is_listed(small):
    (small / "B" / "seg.nii.gz").unlink()
    (small / "C" / "mask.nii.gz").unlink()
    write_pairs(small, "A,B\nA,C\nA,X\nY,B\n")
    with pytest.raises(FileNotFoundError) as error:
        PairDataset(small, "pairs.csv", SHAPE)
    message = str(error.value)
    for path in (small / "B" / "seg.nii.gz", small / "C" / "mask.nii.gz", small / "X", small / "Y"):
        assert str(path) in message
    assert "4 path(s)" in message


def test_files_not_asked_for_may_be_missing(small):
    (small / "B" / "seg.nii.gz").unlink()
    assert len(PairDataset(small, "pairs.csv", SHAPE, seg_filename=None)) == 2


def test_corrupt_image(small):
    (small / "B" / "im.nii.gz").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*B/im\.nii\.gz"):
        PairDataset(small, "pairs.csv", SHAPE)


def test_4d_image(small):
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (2,), dtype=np.float32), AFFINE), small / "C" / "im.nii.gz")
    with pytest.raises(ValueError, match=r"C/im\.nii\.gz.*3D"):
        PairDataset(small, "pairs.csv", SHAPE)


def test_mask_of_other_shape(small):
    write_subject(small, "B", mask=np.ones((10, 12, 9), dtype=np.uint8), seg=False, im=False)
    with pytest.raises(ValueError, match=r"B/mask\.nii\.gz.*\(10, 12, 9\).*\(10, 12, 8\)"):
        PairDataset(small, "pairs.csv", SHAPE)


def test_affine_mismatch_warns(small):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    write_subject(small, "C", affine=shifted)
    with pytest.warns(UserWarning, match=r"A,C"):
        PairDataset(small, "pairs.csv", SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_subject(small, "C")
        PairDataset(small, "pairs.csv", SHAPE)


# ---------------------------------------------------------------- errors at load

def test_nan_image(small):
    im = np.ones(SHAPE, dtype=np.float32)
    im[1, 1, 1] = np.nan
    write_subject(small, "C", im=im, mask=False, seg=False)
    data = PairDataset(small, "pairs.csv", SHAPE)
    data[0]
    with pytest.raises(ValueError, match=r"C/im\.nii\.gz.*NaN"):
        data[1]


def test_empty_mask(small):
    write_subject(small, "B", mask=np.zeros(SHAPE, dtype=np.uint8), im=False, seg=False)
    with pytest.raises(ValueError, match=r"B/mask\.nii\.gz.*empty"):
        PairDataset(small, "pairs.csv", SHAPE)[0]


def test_constant_image(small):
    write_subject(small, "B", im=np.full(SHAPE, 7.0, dtype=np.float32), mask=False, seg=False)
    with pytest.raises(ValueError, match=r"B/im\.nii\.gz.*constant"):
        PairDataset(small, "pairs.csv", SHAPE)[0]


def test_file_replaced_after_construction(small):
    data = PairDataset(small, "pairs.csv", SHAPE)
    write_subject(small, "B", seg=np.zeros((4, 4, 4), dtype=np.int16), im=False, mask=False)
    with pytest.raises(ValueError, match=r"B/seg\.nii\.gz.*differs"):
        data[0]


def test_invalid_dims(small):
    with pytest.raises(ValueError, match="dims"):
        PairDataset(small, "pairs.csv", (16, 16))


# ---------------------------------------------------------------- labels

def test_default_labels_are_the_15_structures():
    assert len(DEFAULT_LABELS) == 15
    assert sorted(DEFAULT_LABELS.values()) == [10, 11, 12, 13, 16, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58]


def test_default_labels_match_synthbrain():
    if not SYNTHBRAIN.is_dir():
        pytest.skip(f"SynthBrain data not found at {SYNTHBRAIN}")
    assert load_labels(SYNTHBRAIN / "labels.json") == DEFAULT_LABELS


def test_demo_labels(demo):
    labels = load_labels(demo / "labels.json")
    assert labels.items() <= DEFAULT_LABELS.items()


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot parse"),
    ("[10, 49]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"thalamus": "10"}', "positive integer"),
    ('{"thalamus": -1}', "positive integer"),
    ('{"thalamus": true}', "positive integer"),
    ('{"thalamus": 10.5}', "positive integer"),
    ('{"a": 10, "b": 10}', "not distinct"),
    ('{" ": 10}', "empty structure name"),
])
def test_invalid_labels(tmp_path, content, message):
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(ValueError, match=rf"labels\.json.*{message}|{message}.*labels\.json"):
        load_labels(tmp_path / "labels.json")


def test_missing_labels_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.json"):
        load_labels(tmp_path / "labels.json")


# ---------------------------------------------------------------- the real data

def test_synthbrain_pair():
    if not SYNTHBRAIN.is_dir():
        pytest.skip(f"SynthBrain data not found at {SYNTHBRAIN}")
    data = PairDataset(SYNTHBRAIN, "pairs_dev.csv", (64, 64, 64))
    assert len(data) == len([line for line in (SYNTHBRAIN / "pairs_dev.csv").read_text().splitlines() if line])
    item = data[0]
    assert item["fixed_id"] == "sub-01"
    assert item["fixed"]["im"].shape == (1, 64, 64, 64)
    assert set(DEFAULT_LABELS.values()) <= set(item["fixed"]["seg"].unique().tolist())
    assert set(DEFAULT_LABELS.values()) <= set(item["moving"]["seg"].unique().tolist())
    # the mask covers the labelled brain, and the working grid spans the same world box (128 -> 64 voxels)
    assert (item["fixed"]["mask"][item["fixed"]["seg"] > 0] == 1).all()
    corners = item["affine"].numpy() @ np.array([[0, 0, 0, 1], [63, 63, 63, 1]]).T
    expected = item["input_affine"].numpy() @ np.array([[0, 0, 0, 1], [127, 127, 127, 1]]).T
    np.testing.assert_allclose(corners, expected, atol=1e-9)
    assert json.loads((SYNTHBRAIN / "labels.json").read_text()) == DEFAULT_LABELS
