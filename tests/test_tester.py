"""test.py end to end on the demo data: metrics table, summary, files per pair, printed table; SimpleITK agrees."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.utils.data import DistributedSampler

import test as test_entry
from data_loader.demo import make_demo_dataset
from tests.demo_config import demo_config, demo_config_dict
from model.variational import QV
from trainer import outputs
from trainer.evaluation import ROW_FIELDS
from trainer.run_folder import create_run_folder
from trainer.tester import Tester as RegistrationTester  # not collected by pytest
from trainer.tester import kept_items
from utils.distributed import Context, setup
from utils.io import load_nifti


SIZE = 16  # demo images 16^3 and dims 16^3: the working grid is the input grid, files and metrics compare 1:1
NO_SAMPLES = 3
ABSENT = ("absent_structure", 99)  # in no segmentation: reported missing, never a crash or a silent zero


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One test.py run on 2 pairs; returns (run folder, printed output, data folder, labels)."""
    root = tmp_path_factory.mktemp("tester")
    data = make_demo_dataset(root / "data", no_subjects=3, size=SIZE)
    labels = {**json.loads((data / "labels.json").read_text()), ABSENT[0]: ABSENT[1]}
    (root / "labels.json").write_text(json.dumps(labels))
    config = demo_config_dict(data, root / "saved", dims=(SIZE,) * 3, labels=str(root / "labels.json"),
                              no_samples_test=NO_SAMPLES)
    (root / "config.json").write_text(json.dumps(config))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # the run's logger prints its table to stdout
        folder = test_entry.main(["-c", str(root / "config.json"), "--device", "cpu"])
    return folder, stdout.getvalue(), data, labels


def read_rows(folder):
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_table_has_one_row_per_pair_sample_and_structure(run):
    folder, _, _, labels = run
    rows = read_rows(folder)
    assert list(rows[0]) == list(ROW_FIELDS)
    samples = ["identity", "mean"] + [str(k) for k in range(NO_SAMPLES)]
    expected = {(p, s, name) for p in ("sub-01_sub-02", "sub-01_sub-03") for s in samples for name in labels}
    assert {(r["pair_id"], r["sample"], r["structure"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        if row["structure"] == ABSENT[0]:
            assert row["status"] == "missing_in_both"
            assert all(math.isnan(float(row[key])) for key in ("dice", "asd_mm", "hd95_mm"))
        else:
            assert row["status"] == "ok"
            assert 0.0 <= float(row["dice"]) <= 1.0 and float(row["asd_mm"]) >= 0.0
            assert float(row["hd95_mm"]) >= 0.0
        if row["sample"] == "identity":
            assert int(row["folding_voxels_mask"]) == 0 and float(row["log_jacobian_std"]) == 0.0
            assert int(row["folding_voxels_reference"]) == 0
        assert 0.0 <= float(row["folding_percent_mask"]) <= 100.0
        assert 0.0 <= float(row["folding_percent_reference"]) <= 100.0


def test_summary_means_medians_and_missing_structures(run):
    folder, _, _, labels = run
    summary = json.loads((folder / "summary.json").read_text())
    rows = read_rows(folder)

    def values(kind, key):
        selected = [float(r[key]) for r in rows if (r["sample"] if r["sample"] in ("identity", "mean")
                                                      else "samples") == kind]
        return np.array([v for v in selected if math.isfinite(v)])

    for kind in ("identity", "mean", "samples"):
        for key in ("dice", "asd_mm", "hd95_mm"):
            stats = summary["metrics"][kind][key]
            assert stats["mean"] == pytest.approx(values(kind, key).mean())
            assert stats["median"] == pytest.approx(np.median(values(kind, key)))
            assert stats["n"] == values(kind, key).size
    assert summary["metrics"]["samples"]["folding_voxels_mask"]["n"] == 2 * NO_SAMPLES  # once per pair and sample
    assert summary["metrics"]["samples"]["folding_voxels_reference"]["n"] == 2 * NO_SAMPLES
    assert summary["mean_dice_samples"] == summary["metrics"]["samples"]["dice"]["mean"]
    assert summary["headline"]["samples"]["asd_mm"] == summary["metrics"]["samples"]["asd_mm"]["mean"]
    assert summary["headline"]["posterior_mean"]["dice"] == summary["mean_dice_after"]
    assert summary["mean_dice_before"] == summary["metrics"]["identity"]["dice"]["mean"]
    assert summary["mean_dice_after"] == summary["metrics"]["mean"]["dice"]["mean"]
    assert summary["no_pairs"] == 2 and summary["no_samples"] == NO_SAMPLES
    assert list(summary["per_structure"]) == list(labels)
    assert summary["per_structure"][ABSENT[0]]["mean"] == {"dice": None, "asd_mm": None, "hd95_mm": None}
    assert {(m["pair_id"], m["sample"]) for m in summary["missing_structures"]
            if m["structure"] == ABSENT[0]} == {(p, s) for p in ("sub-01_sub-02", "sub-01_sub-03")
                                                for s in ("identity", "mean")}
    assert summary["missing_in_samples"] == 2 * NO_SAMPLES
    per_pair = summary["uncertainty"]["per_pair"]
    assert set(per_pair) == {"sub-01_sub-02", "sub-01_sub-03"}
    for stats in per_pair.values():
        assert stats["mean_uncertainty_structures"] > 0 and stats["mean_uncertainty_background"] > 0
        assert 0.0 <= stats["uncertainty_disagreement_auc"] <= 1.0
        assert 0.0 < stats["disagreement_fraction"] < 1.0


def test_printed_table_says_before_after_and_na(run):
    _, printed, _, labels = run
    assert "mean Dice over 2 pairs and" in printed and "before" in printed and "after" in printed
    assert "(posterior mean)" in printed and "(samples)" in printed
    table = printed[printed.index("structure"):]
    assert all(name in table for name in labels)
    absent_line = next(line for line in table.splitlines() if line.startswith(ABSENT[0]))
    assert absent_line.split()[1:] == ["n/a"] * 6


def test_files_per_pair_on_the_input_grid(run):
    folder, _, data, _ = run
    fixed_affine = nib.load(data / "sub-01" / "im.nii.gz").affine
    for moving in ("sub-02", "sub-03"):
        pair = folder / outputs.PAIRS_FOLDER / f"sub-01_{moving}"
        for name in (outputs.WARPED_IM, outputs.WARPED_SEG, outputs.DISPLACEMENT_STD, outputs.DET_JACOBIAN):
            image = nib.load(pair / name)
            assert image.shape == (SIZE,) * 3, name
            np.testing.assert_allclose(image.affine, fixed_affine)
        displacement = nib.load(pair / outputs.DISPLACEMENT)
        assert displacement.shape == (SIZE,) * 3 + (1, 3)
        field = np.asarray(displacement.dataobj)
        assert 0.05 < np.abs(field).max() < 10.0  # mm: the registration moved something, reasonably
        std, _ = load_nifti(pair / outputs.DISPLACEMENT_STD, "image")
        assert std.min() >= 0.0 and std.max() > 0.0
        moving_seg, _ = load_nifti(data / moving / "seg.nii.gz", "seg")
        warped_seg, _ = load_nifti(pair / outputs.WARPED_SEG, "seg")
        assert set(np.unique(warped_seg)) <= set(np.unique(moving_seg))
        warped_im, _ = load_nifti(pair / outputs.WARPED_IM, "image")
        assert 0.0 <= warped_im.min() and warped_im.max() <= 1.0 + 1e-6
        for k in range(NO_SAMPLES):
            for kind in ("warped_im", "warped_seg"):
                assert nib.load(pair / outputs.SAMPLES_FOLDER / outputs.sample_name(kind, k)).shape == (SIZE,) * 3
        assert not (pair / outputs.SAMPLES_FOLDER / outputs.sample_name("warped_im", NO_SAMPLES)).exists()
        panel = matplotlib.image.imread(pair / outputs.PANEL)
        assert panel.shape[0] > 300 and panel.shape[1] > 3 * panel.shape[0] // 2
    assert matplotlib.image.imread(folder / "summary.png").shape[0] > 300


def to_sitk(array: np.ndarray, spacing) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    return image


def test_dice_and_surface_distances_agree_with_simpleitk_on_the_saved_files(run):
    folder, _, data, labels = run
    fixed_seg, affine = load_nifti(data / "sub-01" / "seg.nii.gz", "seg")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rows = {(r["pair_id"], r["structure"]): r for r in read_rows(folder) if r["sample"] == "mean"}
    for moving in ("sub-02", "sub-03"):
        warped_seg, _ = load_nifti(folder / outputs.PAIRS_FOLDER / f"sub-01_{moving}" / outputs.WARPED_SEG, "seg")
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(to_sitk(fixed_seg.astype(np.int32), spacing), to_sitk(warped_seg.astype(np.int32), spacing))
        for name, label in labels.items():
            if name == ABSENT[0]:
                continue
            row = rows[(f"sub-01_{moving}", name)]
            assert float(row["dice"]) == pytest.approx(overlap.GetDiceCoefficient(label), rel=1e-9)
            contours = [sitk.LabelContour(to_sitk((seg == label).astype(np.uint8), spacing), fullyConnected=False)
                        for seg in (fixed_seg, warped_seg)]
            hausdorff = sitk.HausdorffDistanceImageFilter()  # the reference's ASD: its average Hausdorff distance
            hausdorff.Execute(contours[0], contours[1])
            assert float(row["asd_mm"]) == pytest.approx(hausdorff.GetAverageHausdorffDistance(), rel=1e-5, abs=1e-5)
            masks = [sitk.GetArrayFromImage(c) > 0 for c in contours]
            maps = [np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                c, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))) for c in contours]
            distances = np.concatenate([maps[1][masks[0]], maps[0][masks[1]]]).astype(np.float64)
            assert float(row["hd95_mm"]) == pytest.approx(np.percentile(distances, 95), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("size,world,batch", [(7, 2, 1), (7, 3, 2), (4, 2, 2), (5, 4, 1)])
def test_kept_items_drop_exactly_the_distributed_samplers_repeats(size, world, batch):
    seen = []
    for rank in range(world):
        indices = list(DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=False))
        context = Context(rank, world, rank, torch.device("cpu"))
        for index, start in enumerate(range(0, len(indices), batch)):
            chunk = indices[start:start + batch]
            keep = kept_items(index, len(chunk), batch, context, size)
            seen += [i for i, k in zip(chunk, keep) if k]
    assert sorted(seen) == list(range(size))


def test_pairs_without_segmentations_still_get_transformation_metrics(run, tmp_path):
    _, _, data, _ = run
    config = demo_config(data, tmp_path, dims=(SIZE,) * 3, no_samples_test=2, save_outputs=False,
                         save_figures=False)
    context = setup("cpu")
    tester = RegistrationTester(config, create_run_folder(config.trainer.save_dir, config.name, "test", context),
                                context)
    batch = next(iter(tester.loader))
    for side in ("fixed", "moving"):
        batch[side].pop("seg")
    q_v = QV.initial(2, (SIZE,) * 3, 0.5, 0.1)
    rows, uncertainty = tester.evaluate(batch, q_v)
    assert [(r["sample"], r["status"]) for r in rows if r["pair_id"] == "sub-01_sub-02"] == [
        ("identity", "no_segmentation"), ("mean", "no_segmentation"), ("0", "no_segmentation"),
        ("1", "no_segmentation")]
    assert all(math.isnan(r["dice"]) and r["structure"] == "" for r in rows)
    assert all(math.isfinite(r["log_jacobian_std"]) for r in rows)
    assert set(uncertainty) == {"sub-01_sub-02", "sub-01_sub-03"}
    assert all(stats["mean_uncertainty_mask"] > 0 for stats in uncertainty.values())
    assert not (tester.folder / outputs.PAIRS_FOLDER).exists()
