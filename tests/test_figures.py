"""Figures: the per-pair panel, the per-structure box plots, the TensorBoard montage and the compare command."""
from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest

from trainer.evaluation import ROW_FIELDS
from utils import compare
from utils.figures import comparison_boxplots, mid_slices, pair_panel, slice_montage

SHAPE = (10, 12, 14)


def volumes(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    fixed = rng.random(SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, np.int64)
    seg[3:7, 4:8, 5:10] = 10
    seg[5:9, 2:6, 2:6] = 11
    return {"fixed": fixed, "moving": np.roll(fixed, 1, axis=0), "warped": fixed * 0.9, "fixed_seg": seg,
            "warped_seg": np.roll(seg, 1, axis=1), "displacement_mm": rng.standard_normal((3, *SHAPE)),
            "uncertainty_mm": rng.random(SHAPE), "det_jacobian": 1.0 + 0.3 * rng.standard_normal(SHAPE)}


def test_mid_slices_cut_through_the_centre_of_each_axis():
    volume = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    slices = mid_slices(volume)
    assert [s.shape for s in slices] == [(14, 12), (14, 10), (12, 10)]
    np.testing.assert_array_equal(slices[0], volume[5].T)
    np.testing.assert_array_equal(slices[1], volume[:, 6].T)
    np.testing.assert_array_equal(slices[2], volume[:, :, 7].T)


@pytest.mark.parametrize("with_optional", [True, False])
def test_pair_panel_is_a_png_with_three_rows_of_panels(tmp_path, with_optional):
    data = volumes()
    if not with_optional:
        data.update(fixed_seg=None, warped_seg=None, uncertainty_mm=None)
    path = pair_panel(tmp_path / "pair" / "panel.png", spacing=(1.0, 1.2, 2.0), labels=[10, 11, 12],
                      title="sub-01_sub-02", **data)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 600
    assert image.shape[1] == pytest.approx(190 * (9 if with_optional else 8), rel=0.02)  # one column per quantity
    assert image[..., :3].std() > 0.1  # drawn, not blank
    assert not list((tmp_path / "pair").glob(".tmp-*"))  # written atomically


def test_comparison_boxplots_handle_nan_and_missing_structures(tmp_path):
    results = {
        "baseline": {"a": {"dice": [0.5, 0.6, math.nan], "asd_mm": [1.0, 2.0, math.nan]},
                     "b": {"dice": [math.nan], "asd_mm": [math.nan]}},
        "learnt": {"a": {"dice": [0.7, 0.8], "asd_mm": [0.5, 0.7]}, "c": {"dice": [0.9], "asd_mm": [0.2]}},
    }
    path = comparison_boxplots(tmp_path / "fig.png", results)
    image = matplotlib.image.imread(path)
    assert image.shape[0] == pytest.approx(640, rel=0.02)  # two metric panels of 3.2 inches at 100 dpi
    with pytest.raises(ValueError, match="no results"):
        comparison_boxplots(tmp_path / "empty.png", {})


def test_slice_montage_is_a_scaled_one_channel_image_with_the_origin_at_the_bottom():
    volume = np.zeros(SHAPE, np.float32)
    volume[5, :, 0] = 3.0  # in the first slice (across axis 0): the bottom row once flipped
    montage = slice_montage(volume)
    assert montage.shape == (1, 14, 12 + 1 + 10 + 1 + 10)
    assert montage.min() == 0.0 and montage.max() == 1.0
    np.testing.assert_array_equal(montage[0, -1, :12], np.ones(12))
    assert not montage[0, :-1, :12].any()
    assert not slice_montage(np.ones(SHAPE)).any()  # constant volumes stay finite


def write_metrics(folder, dice_by_structure: dict, sample: str = "mean") -> None:
    """A metrics.csv as test.py writes it, with the given Dice values (and ASD = 1 - Dice)."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        for structure, values in dice_by_structure.items():
            for k, value in enumerate(values):
                for kind in ("identity", sample):
                    writer.writerow({"pair_id": f"p{k}", "fixed_id": "f", "moving_id": f"m{k}", "sample": kind,
                                     "structure": structure, "label": 1, "status": "ok",
                                     "dice": value if kind != "identity" else 0.1, "asd_mm": 1 - value,
                                     "hd95_mm": 2 - value, "folding_voxels_reference": 0,
                                     "folding_percent_reference": 0.0, "folding_voxels_mask": 0,
                                     "folding_percent_mask": 0.0,
                                     "log_jacobian_std": 0.1})


def test_compare_command_reads_result_folders_and_writes_the_figure(tmp_path, capsys):
    write_metrics(tmp_path / "ssd", {"left": [0.5, 0.6], "right": [0.4, 0.5]})
    write_metrics(tmp_path / "learnt", {"left": [0.7, 0.8], "right": [0.6, float("nan")]})
    output = tmp_path / "out" / "fig.png"
    (tmp_path / "learnt" / "summary.json").write_text(json.dumps({
        "mean_dice_after": 0.75, "uncertainty": {"mean": {"mean_uncertainty_structures": 1.25,
                                                          "uncertainty_disagreement_auc": None}}}))
    path = compare.main([str(tmp_path / "ssd"), str(tmp_path / "learnt"), "-o", str(output),
                         "--names", "baseline", "learnt", "--metrics", "dice", "asd_mm", "hd95_mm"])
    printed = capsys.readouterr().out
    assert path == output and "wrote" in printed
    table = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[1:3]}
    assert table == {"baseline": ["n/a"] * 4, "learnt": ["0.750", "1.250", "n/a", "n/a"]}
    assert matplotlib.image.imread(output).shape[0] == pytest.approx(960, rel=0.02)  # three panels

    grouped = compare.by_structure(compare.read_metrics(tmp_path / "learnt"))
    assert grouped["left"]["dice"] == [0.7, 0.8]
    assert math.isnan(grouped["right"]["dice"][1])
    assert compare.by_structure(compare.read_metrics(tmp_path / "ssd"), "identity")["left"]["dice"] == [0.1, 0.1]


def test_compare_samples_pool_every_sample(tmp_path):
    write_metrics(tmp_path / "run", {"left": [0.5, 0.6, 0.7]}, sample="2")
    grouped = compare.by_structure(compare.read_metrics(tmp_path / "run"), "samples")
    assert grouped["left"]["dice"] == [0.5, 0.6, 0.7]


def test_compare_rejects_bad_arguments(tmp_path):
    write_metrics(tmp_path / "run", {"left": [0.5]})
    with pytest.raises(ValueError, match="names"):
        compare.compare([tmp_path / "run"], tmp_path / "fig.png", names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        compare.compare([tmp_path / "nothing"], tmp_path / "fig.png")
    with pytest.raises(ValueError, match="sample"):
        compare.by_structure([], "median")
