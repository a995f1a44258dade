"""data_loader.demo: the phantom dataset is complete, deterministic, brain-like and registrable (no folding)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from data_loader import demo
from data_loader.demo import ensure_demo_dataset, main, make_demo_dataset, random_displacement, structure_labels
from utils.io import load_nifti, read_nifti_header

SIZE, NO_SUBJECTS = 32, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "data"
    start = time.perf_counter()
    make_demo_dataset(path, no_subjects=NO_SUBJECTS, size=SIZE, seed=0)
    return path, time.perf_counter() - start


def load_subject(path, subject):
    """(image, mask, seg, affine) of one demo subject."""
    im, affine = load_nifti(path / subject / "im.nii.gz", "image")
    mask, _ = load_nifti(path / subject / "mask.nii.gz", "mask")
    seg, _ = load_nifti(path / subject / "seg.nii.gz", "seg")
    return im, mask, seg, affine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_layout_pairs_and_labels(dataset):
    path, seconds = dataset
    assert seconds < 5.0
    ids = [f"sub-{k:02d}" for k in range(1, NO_SUBJECTS + 1)]
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ids
    for subject in ids:
        for name in ("im.nii.gz", "mask.nii.gz", "seg.nii.gz"):
            assert read_nifti_header(path / subject / name)[0] == (SIZE,) * 3
    lines = (path / "pairs.csv").read_text().splitlines()
    assert lines == [f"sub-01,{subject}" for subject in ids[1:]]
    labels = json.loads((path / "labels.json").read_text())
    assert labels == structure_labels()
    # FreeSurfer ids of the paper's structures, named as the project's labels.json
    assert {"left_thalamus": 10, "right_thalamus": 49, "left_caudate": 11, "right_caudate": 50,
            "left_putamen": 12, "right_putamen": 51, "left_hippocampus": 17, "right_hippocampus": 53,
            "brain_stem": 16}.items() <= labels.items()


def test_geometry_is_2mm_and_centred(dataset):
    path, _ = dataset
    _, _, _, affine = load_subject(path, "sub-03")
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    assert np.linalg.det(affine[:3, :3]) > 0  # RAS-like, no flip
    assert np.abs(affine[:3, 3]).min() > 10.0  # a real translation
    np.testing.assert_allclose(affine @ ([(SIZE - 1) / 2] * 3 + [1]), [0, 0, 0, 1], atol=1e-6)


def test_every_subject_is_brain_like(dataset):
    path, _ = dataset
    labels = structure_labels().values()
    for k in range(1, NO_SUBJECTS + 1):
        im, mask, seg, _ = load_subject(path, f"sub-{k:02d}")
        assert im.min() >= 0.0 and im.max() <= 1.0
        np.testing.assert_array_equal(mask, seg > 0)
        assert (im[~mask] == 0).all()
        assert 0.1 < mask.mean() < 0.6  # a brain, not the whole field of view, and away from its faces
        assert not mask[0].any() and not mask[-1].any()
        assert set(labels) <= set(np.unique(seg))  # every structure survives the deformation
        assert {2, 41, 3, 42, 4, 43} <= set(np.unique(seg))  # white matter, cortex, ventricles


def test_labels_have_distinct_intensities(dataset):
    path, _ = dataset
    im, _, seg, _ = load_subject(path, "sub-01")
    medians = {label: np.median(im[seg == label]) for label in [2, 3, 4, 10, 11, 12, 16, 17]}
    values = sorted(medians.values())
    assert min(np.diff(values)) > 0.02, medians
    # cortex-like shell darker than white matter, ventricles darkest (T1-like)
    assert medians[4] < medians[3] < medians[2]


def test_subjects_differ_by_deformation_and_dice_is_moderate(dataset):
    path, _ = dataset
    _, _, atlas_seg, _ = load_subject(path, "sub-01")
    labels = structure_labels().values()
    per_pair = []
    for k in range(2, NO_SUBJECTS + 1):
        _, _, seg, _ = load_subject(path, f"sub-{k:02d}")
        per_pair.append(np.mean([dice(atlas_seg == label, seg == label) for label in labels]))
    mean_dice = float(np.mean(per_pair))
    print(f"\ndemo mean Dice before registration (sub-01 vs others, {len(labels)} structures): {mean_dice:.3f}; "
          f"per pair {np.round(per_pair, 3).tolist()}")
    assert 0.5 <= mean_dice <= 0.7
    assert min(per_pair) > 0.3 and max(per_pair) < 0.95


@pytest.mark.parametrize("size", [16, 32, 48])
def test_deformations_are_smooth_and_do_not_fold(size):
    for k in range(1, 6):
        u = random_displacement(size, np.random.default_rng([0, k]))[0].numpy()
        jacobian = np.stack([np.stack(np.gradient(u[i]), 0) for i in range(3)]) + np.eye(3)[:, :, None, None, None]
        det = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
        assert det.min() > 0.2
        assert 0.02 * size < np.abs(u).max() < 0.2 * size  # a visible deformation, not a wild one


def test_deterministic_for_a_seed(dataset, tmp_path):
    path, _ = dataset
    make_demo_dataset(tmp_path / "same", no_subjects=3, size=SIZE, seed=0)
    make_demo_dataset(tmp_path / "other", no_subjects=3, size=SIZE, seed=1)
    for subject in ("sub-01", "sub-03"):
        ours = load_subject(path, subject)
        same = load_subject(tmp_path / "same", subject)
        for a, b in zip(ours, same):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(load_subject(path, "sub-03")[2], load_subject(tmp_path / "other", "sub-03")[2])


def test_ensure_creates_once_and_leaves_existing_alone(tmp_path):
    path = tmp_path / "demo"
    assert ensure_demo_dataset(path, no_subjects=2, size=16) == path
    assert (path / "sub-02" / "seg.nii.gz").is_file()
    marker = path / "sub-01" / "im.nii.gz"
    marker.write_bytes(b"user data")
    ensure_demo_dataset(path, no_subjects=2, size=16)
    assert marker.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_interrupted_ensure_leaves_no_half_dataset(tmp_path, monkeypatch):
    real = demo.make_demo_dataset

    def interrupted(path, **params):
        real(path, **params)  # the files are all written ...
        raise KeyboardInterrupt  # ... but the run dies before the rename

    monkeypatch.setattr(demo, "make_demo_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path / "demo", no_subjects=2, size=16)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--size", "16", "--subjects", "3", "--seed", "4"])
    assert "created" in capsys.readouterr().out
    assert (tmp_path / "cli" / "pairs.csv").read_text().splitlines() == ["sub-01,sub-02", "sub-01,sub-03"]
    assert read_nifti_header(tmp_path / "cli" / "sub-03" / "im.nii.gz")[0] == (16, 16, 16)
    main([str(tmp_path / "cli")])
    assert "left unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("params", [{"no_subjects": 1}, {"size": 4}])
def test_invalid_parameters(tmp_path, params):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "x", **params)
