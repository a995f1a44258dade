"""trainer.evaluation and the uncertainty statistics: samples of q_v, running moments, summary and table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model.energy import Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QV
from trainer.evaluation import (RunningMoments, format_table, mean_displacement, sample_displacements, summarise,
                                voxel_spacing)
from utils.metrics import uncertainty_error_stats
from utils.sobolev import sobolev_kernel

DIMS = (8, 9, 10)


def energy(noise: float = 0.1) -> Energy:
    return Energy(SVF(DIMS), SimilarityMetric("SSD", learnable=False), 1.0, sobolev_kernel(), noise)


# ---- uncertainty vs error -----------------------------------------------------------------------------------------

def segs():
    fixed = np.zeros((6, 6, 6), np.int64)
    fixed[1:4, 1:4, 1:4] = 10
    warped = np.zeros_like(fixed)
    warped[2:5, 1:4, 1:4] = 10  # disagrees on two 3x3 slabs
    return fixed, warped


@pytest.mark.parametrize("direction,auc", [(1.0, 1.0), (-1.0, 0.0)])
def test_uncertainty_that_marks_the_errors_has_auc_one(direction, auc):
    fixed, warped = segs()
    disagree = fixed != warped
    uncertainty = 1.0 + direction * disagree  # 2 (or 0) where labels disagree, 1 elsewhere
    stats = uncertainty_error_stats(uncertainty, fixed, warped, [10])
    assert stats["uncertainty_disagreement_auc"] == pytest.approx(auc)
    assert stats["uncertainty_disagreement_correlation"] == pytest.approx(direction)
    assert stats["mean_uncertainty_disagreement"] == pytest.approx(1.0 + direction)
    assert stats["mean_uncertainty_agreement"] == pytest.approx(1.0)
    assert stats["disagreement_fraction"] == pytest.approx(18 / 36)  # 18 disagree among the 36 labelled voxels


def test_uncertainty_stats_structures_background_mask_and_ties():
    fixed, warped = segs()
    uncertainty = np.where(fixed == 10, 3.0, 1.0)
    mask = np.ones(fixed.shape, bool)
    mask[5] = False
    stats = uncertainty_error_stats(torch.from_numpy(uncertainty), fixed, warped, [10], mask)
    assert stats["mean_uncertainty_structures"] == 3.0 and stats["mean_uncertainty_background"] == 1.0
    assert stats["mean_uncertainty_mask"] == pytest.approx((27 * 3 + (180 - 27)) / 180)
    constant = uncertainty_error_stats(np.ones(fixed.shape), fixed, warped, [10])
    assert constant["uncertainty_disagreement_auc"] == 0.5  # ties count half
    assert math.isnan(constant["uncertainty_disagreement_correlation"])
    perfect = uncertainty_error_stats(np.ones(fixed.shape), fixed, fixed, [10])
    assert perfect["disagreement_fraction"] == 0.0 and math.isnan(perfect["uncertainty_disagreement_auc"])
    nothing = uncertainty_error_stats(np.ones(fixed.shape), fixed, fixed, [99])
    assert math.isnan(nothing["mean_uncertainty_structures"]) and math.isnan(nothing["disagreement_fraction"])


# ---- samples of q_v -----------------------------------------------------------------------------------------------

def test_running_moments_match_torch():
    values = torch.randn(7, 2, 3, 4, dtype=torch.float64)
    moments = RunningMoments()
    for value in values:
        moments.update(value)
    torch.testing.assert_close(moments.mean, values.mean(0))
    torch.testing.assert_close(moments.variance(), values.var(0))
    single = RunningMoments()
    single.update(values[0])
    assert torch.isnan(single.variance()).all()


@pytest.mark.parametrize("no_samples", [1, 3, 4])
def test_samples_collapse_to_the_posterior_mean_without_noise(no_samples):
    torch.manual_seed(0)
    q_v = QV.initial(2, DIMS, 1e-6, 0.0)
    with torch.no_grad():
        q_v.mu.copy_(torch.randn_like(q_v.mu))
    mean = mean_displacement(energy(noise=5.0), q_v)  # large noise: must not be used at test time
    samples = list(sample_displacements(energy(noise=5.0), q_v, no_samples))
    assert len(samples) == no_samples
    for sample in samples:
        assert sample.shape == (2, 3, *DIMS)
        torch.testing.assert_close(sample, mean, atol=1e-4, rtol=0)


def test_antithetic_samples_are_symmetric_about_the_mean_velocity():
    torch.manual_seed(1)
    q_v = QV.initial(1, DIMS, 0.3, 0.1)
    flat = Energy(SVF(DIMS, no_squarings=0), SimilarityMetric("SSD", learnable=False), 1.0, None, 0.0)
    first, second = list(sample_displacements(flat, q_v, 2))  # no squarings: displacement = velocity
    torch.testing.assert_close(first + second, 2 * q_v.mu.detach(), atol=1e-6, rtol=0)
    assert (first - second).abs().max() > 0.1


def test_voxel_spacing_is_the_column_norms():
    affine = np.array([[0.0, 0.0, -1.5, 1], [1.2, 0.0, 0.0, 2], [0.0, 2.0, 0.0, 3], [0, 0, 0, 1]])
    assert voxel_spacing(affine) == pytest.approx((1.2, 2.0, 1.5))


# ---- summary and table --------------------------------------------------------------------------------------------

def row(pair, sample, structure, dice, asd, folding=0, status="ok"):
    return {"pair_id": pair, "fixed_id": "f", "moving_id": pair, "sample": sample, "structure": structure,
            "label": 1, "status": status, "dice": dice, "asd_mm": asd, "hd95_mm": 2 * asd,
            "folding_voxels_reference": 2 * folding, "folding_percent_reference": folding / 5,
            "folding_voxels_mask": folding, "folding_percent_mask": folding / 10, "log_jacobian_std": 0.1}


def test_summary_ignores_missing_structures_and_counts_transformations_once():
    nan = math.nan
    rows = [row("p1", "identity", "a", 0.5, 1.0), row("p1", "identity", "b", nan, nan, status="missing_in_both"),
            row("p1", "mean", "a", 0.7, 0.5, folding=2), row("p1", "mean", "b", nan, nan, 2, "missing_in_both"),
            row("p2", "mean", "a", 0.9, 0.3, folding=4), row("p2", "mean", "b", 0.0, nan, 4, "missing_in_warped"),
            row("p1", "0", "a", 0.6, 0.6), row("p1", "1", "a", 0.8, 0.4, status="ok")]
    uncertainty = {"p1": {"mean_uncertainty_structures": 0.5, "uncertainty_disagreement_auc": nan},
                   "p2": {"mean_uncertainty_structures": 1.5, "uncertainty_disagreement_auc": 0.7}}
    summary = summarise(rows, uncertainty, 2, {"a": 1, "b": 2})
    mean = summary["metrics"]["mean"]
    assert mean["dice"] == {"mean": pytest.approx(1.6 / 3), "median": 0.7, "n": 3}
    assert mean["asd_mm"]["n"] == 2
    assert mean["folding_voxels_mask"] == {"mean": 3.0, "median": 3.0, "n": 2}  # per pair, not per structure
    assert mean["folding_voxels_reference"] == {"mean": 6.0, "median": 6.0, "n": 2}
    assert summary["metrics"]["samples"]["dice"]["mean"] == pytest.approx(0.7)
    assert summary["per_structure"]["b"]["identity"] == {"dice": None, "asd_mm": None, "hd95_mm": None}
    assert summary["per_structure"]["b"]["mean"]["dice"] == 0.0
    assert summary["mean_dice_before"] == 0.5 and summary["mean_dice_after"] == pytest.approx(1.6 / 3)
    assert summary["mean_dice_samples"] == pytest.approx(0.7)
    headline = summary["headline"]
    assert headline["samples"] == {"dice": pytest.approx(0.7), "asd_mm": pytest.approx(0.5),
                                   "folding_voxels_reference": 0.0}
    assert headline["posterior_mean"] == {"dice": pytest.approx(1.6 / 3), "asd_mm": pytest.approx(0.4),
                                          "folding_voxels_reference": 6.0}
    assert "reference reported" in headline["note"]
    assert len(summary["missing_structures"]) == 3
    assert summary["uncertainty"]["mean"] == {"mean_uncertainty_structures": 1.0,
                                              "uncertainty_disagreement_auc": 0.7}
    assert summary["uncertainty"]["per_pair"]["p1"]["uncertainty_disagreement_auc"] is None
    json.dumps(summary, allow_nan=False)

    table = format_table(summary)
    lines = table.splitlines()
    assert "samples" in lines[0] and "posterior-mean" in lines[0] and "reference reported" in lines[0]
    assert lines[1].split() == ["structure", "Dice", "before", "Dice", "mean", "Dice", "samples", "ASD", "mm", "mean",
                                "ASD", "mm", "samples", "HD95", "mm", "mean"]
    assert next(line for line in lines if line.startswith("b ")).split()[1] == "n/a"
    all_line = next(line for line in lines if line.startswith("all structures")).split()[2:]
    assert all_line == ["0.500", "0.533", "0.700", "0.40", "0.50", "0.80"]
    assert "(the reference's count): 6.0 voxels (posterior mean), 0.0 (samples)" in table
    assert "3 structure(s) missing" in table
