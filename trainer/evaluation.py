"""Evaluation of inferred q_v: posterior mean and samples of the transformation, metric rows, and their summary.

Everything is computed on the working grid. Rows of the metrics table (one per pair, transformation and
structure) carry a ``sample`` column: ``identity`` (before registration), ``mean`` (the transformation of the
posterior mean of v) or ``0``, ``1``, ... (samples of q_v).
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from model.energy import Energy
from model.variational import QV
from utils.flow import warp
from utils.metrics import evaluate_pair, transformation_metrics

STRUCTURE_METRICS = ("dice", "asd_mm", "hd95_mm")
TRANSFORMATION_METRICS = ("folding_voxels_reference", "folding_percent_reference", "folding_voxels_mask",
                          "folding_percent_mask", "log_jacobian_std")
ROW_FIELDS = ("pair_id", "fixed_id", "moving_id", "sample", "structure", "label", "status", *STRUCTURE_METRICS,
              *TRANSFORMATION_METRICS)
KINDS = ("identity", "mean", "samples")
HEADLINE_METRICS = ("dice", "asd_mm", "folding_voxels_reference")
HEADLINE_NOTE = ("samples: the no_samples_test samples of q_v pooled, the figures the reference reported; "
                 "posterior_mean: the transformation of the posterior mean of v; means over pairs and structures")


def voxel_spacing(affine) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes: the norms of the columns of a voxel-to-world affine (4, 4)."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(n) for n in np.linalg.norm(matrix, axis=0))


@torch.no_grad()
def mean_displacement(energy: Energy, q_v: QV) -> torch.Tensor:
    """Displacement (B, 3, *dims), voxel units, of the transformation of the Sobolev-smoothed posterior mean."""
    return energy.displacement(q_v.mu)


@torch.no_grad()
def sample_displacements(energy: Energy, q_v: QV, no_samples: int) -> Iterator[torch.Tensor]:
    """``no_samples`` displacements (B, 3, *dims), voxel units, of smoothed samples of q_v, without uniform noise.

    Drawn as antithetic pairs mu +- (sigma e + x u), both of a pair integrated in one call; yielded one at a time
    so that memory does not grow with the number of samples.
    """
    batch, produced = q_v.mu.shape[0], 0
    while produced < no_samples:
        displacements = energy.displacement(torch.cat(q_v.sample()))
        for displacement in displacements.split(batch):
            if produced < no_samples:
                produced += 1
                yield displacement


class RunningMoments:
    """Voxelwise mean and variance of a stream of tensors (Welford's algorithm, float64)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = value.clone(), torch.zeros_like(value)
            return
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def variance(self) -> torch.Tensor:
        """Unbiased variance (correction 1); NaN with fewer than two values."""
        if self.count < 2:
            return torch.full_like(self.mean, math.nan)
        return self.m2 / (self.count - 1)


def structure_status(present_fixed: bool, present_warped: bool) -> str:
    """``ok`` when a structure is in both segmentations, else which one misses it."""
    if present_fixed and present_warped:
        return "ok"
    if present_fixed:
        return "missing_in_warped"
    return "missing_in_fixed" if present_warped else "missing_in_both"


def metric_rows(identity: Mapping[str, str], sample: str, fixed_seg, warped_seg, displacement: torch.Tensor,
                labels: Mapping[str, int], spacing: Sequence[float], mask) -> list[dict]:
    """Rows of one pair and transformation: one per structure, or a single structure-less row without segs.

    ``identity``: pair_id, fixed_id, moving_id. Segmentations (D, H, W) or None; displacement (3, D, H, W), voxel
    units; ``mask`` (D, H, W) restricts the transformation metrics. A structure missing from a segmentation gets
    its ``status``, and NaN where a metric is undefined (Dice 0 if only one segmentation has it).
    """
    base = {**identity, "sample": sample}
    if fixed_seg is None or warped_seg is None or not labels:
        return [{**base, "structure": "", "label": "", "status": "no_segmentation", "dice": math.nan,
                 "asd_mm": math.nan, "hd95_mm": math.nan, **transformation_metrics(displacement, mask)}]
    rows, transformation = evaluate_pair(fixed_seg, warped_seg, displacement, labels, spacing, mask)
    return [{**base, "structure": row["structure"], "label": row["label"],
             "status": structure_status(row["present_fixed"], row["present_warped"]),
             **{key: row[key] for key in STRUCTURE_METRICS}, **transformation} for row in rows]


def kind_of(sample: str) -> str:
    """``identity``, ``mean`` or ``samples`` for a row's sample column."""
    return sample if sample in ("identity", "mean") else "samples"


def _statistics(values: Sequence[float]) -> dict:
    """Mean, median and count of the finite values (mean and median None when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": float(array.mean()), "median": float(np.median(array)), "n": int(array.size)}


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def summarise(rows: Sequence[dict], uncertainty: Mapping[str, Mapping[str, float]], no_samples: int,
              labels: Mapping[str, int]) -> dict:
    """JSON-ready summary of the metric rows and of the per-pair uncertainty statistics.

    Means and medians over pairs and structures (and samples, for ``samples``) ignore NaN (missing structures);
    transformation metrics are taken once per pair and transformation. Undefined values are None (JSON null).
    """
    summary: dict = {"no_pairs": len({r["pair_id"] for r in rows}), "no_samples": no_samples,
                     "structures": dict(labels), "metrics": {}, "per_structure": {}}
    for kind in KINDS:
        selected = [r for r in rows if kind_of(r["sample"]) == kind]
        per_transformation = {(r["pair_id"], r["sample"]): r for r in selected}.values()
        summary["metrics"][kind] = {
            **{key: _statistics([r[key] for r in selected]) for key in STRUCTURE_METRICS},
            **{key: _statistics([r[key] for r in per_transformation]) for key in TRANSFORMATION_METRICS},
        }
        for structure in labels:
            of_structure = [r for r in selected if r["structure"] == structure]
            summary["per_structure"].setdefault(structure, {})[kind] = {
                key: _statistics([r[key] for r in of_structure])["mean"] for key in STRUCTURE_METRICS}
    summary["mean_dice_before"] = summary["metrics"]["identity"]["dice"]["mean"]
    summary["mean_dice_after"] = summary["metrics"]["mean"]["dice"]["mean"]
    summary["mean_dice_samples"] = summary["metrics"]["samples"]["dice"]["mean"]
    summary["headline"] = {
        "note": HEADLINE_NOTE,
        **{name: {key: summary["metrics"][kind][key]["mean"] for key in HEADLINE_METRICS}
           for name, kind in (("samples", "samples"), ("posterior_mean", "mean"), ("before", "identity"))},
    }
    summary["missing_structures"] = [
        {"pair_id": r["pair_id"], "sample": r["sample"], "structure": r["structure"], "status": r["status"]}
        for r in rows if r["status"] not in ("ok", "no_segmentation") and kind_of(r["sample"]) != "samples"]
    summary["missing_in_samples"] = sum(1 for r in rows if r["status"] not in ("ok", "no_segmentation")
                                        and kind_of(r["sample"]) == "samples")
    keys = list(dict.fromkeys(key for stats in uncertainty.values() for key in stats))
    summary["uncertainty"] = {
        "per_pair": {pair: {key: _finite_or_none(value) for key, value in stats.items()}
                     for pair, stats in sorted(uncertainty.items())},
        "mean": {key: _statistics([stats.get(key, math.nan) for stats in uncertainty.values()])["mean"]
                 for key in keys},
    }
    return summary


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(summary: Mapping, transformation_name: str = "posterior mean") -> str:
    """A short text table of a summary: per structure Dice and ASD before registration, with the method's
    transformation (``mean``) and over the samples of q_v (the figures the reference reported), HD95 of ``mean``;
    then folding. ``transformation_name``: what the ``mean`` rows hold (the posterior mean of q_v, or VoxelMorph's
    output)."""
    header = (f"{'structure':<22}{'Dice before':>12}{'Dice mean':>11}{'Dice samples':>14}{'ASD mm mean':>13}"
              f"{'ASD mm samples':>16}{'HD95 mm mean':>14}")
    lines = [f"mean: {transformation_name.replace(' ', '-')} transformation; samples: the samples of q_v pooled (as the "
             f"reference reported)",
             header, "-" * len(header)]
    entries = list(summary["per_structure"].items())
    entries.append(("all structures", {kind: {key: summary["metrics"][kind][key]["mean"]
                                              for key in STRUCTURE_METRICS} for kind in KINDS}))
    for structure, values in entries:
        lines.append(f"{structure:<22}{_cell(values['identity']['dice'], 3):>12}{_cell(values['mean']['dice'], 3):>11}"
                     f"{_cell(values['samples']['dice'], 3):>14}{_cell(values['mean']['asd_mm'], 2):>13}"
                     f"{_cell(values['samples']['asd_mm'], 2):>16}{_cell(values['mean']['hd95_mm'], 2):>14}")
    mean, samples = summary["metrics"]["mean"], summary["metrics"]["samples"]
    lines.append(f"folding per pair, det J < 0 over the volume (the reference's count): "
                 f"{_cell(mean['folding_voxels_reference']['mean'], 1)} voxels ({transformation_name}), "
                 f"{_cell(samples['folding_voxels_reference']['mean'], 1)} (samples)")
    lines.append(f"det J <= 0 in the fixed mask: {_cell(mean['folding_voxels_mask']['mean'], 1)} voxels "
                 f"({_cell(mean['folding_percent_mask']['mean'], 3)} %) ({transformation_name}), "
                 f"{_cell(samples['folding_voxels_mask']['mean'], 1)} (samples); std log det J "
                 f"{_cell(mean['log_jacobian_std']['mean'], 3)} ({transformation_name})")
    uncertainty = summary["uncertainty"]["mean"]
    if uncertainty:
        lines.append(f"displacement std over {summary['no_samples']} samples: "
                     f"{_cell(uncertainty.get('mean_uncertainty_structures'), 3)} mm in structures, "
                     f"{_cell(uncertainty.get('mean_uncertainty_background'), 3)} mm elsewhere in the mask; "
                     f"{_cell(uncertainty.get('mean_uncertainty_disagreement'), 3)} mm where labels disagree vs "
                     f"{_cell(uncertainty.get('mean_uncertainty_agreement'), 3)} mm where they agree "
                     f"(AUC {_cell(uncertainty.get('uncertainty_disagreement_auc'), 3)})")
    if summary["missing_structures"]:
        lines.append(f"{len(summary['missing_structures'])} structure(s) missing in a segmentation "
                     f"(see summary.json 'missing_structures'; rows with status != ok)")
    return "\n".join(lines)


@torch.no_grad()
def batch_registration_metrics(displacement: torch.Tensor, batch: dict, labels: Mapping[str, int]) -> list[dict]:
    """Mean Dice, ASD (mm) and folding (det J <= 0, % of the fixed mask) of the posterior mean, per pair of a batch.

    ``displacement`` (B, 3, D, H, W), voxel units: that of the posterior mean. Cheap enough to run during
    training: one nearest-neighbour warp per batch. Empty when the batch has no segmentations.
    """
    if "seg" not in batch["fixed"] or "seg" not in batch["moving"]:
        return []
    displacement = displacement.cpu()
    warped_seg = warp(batch["moving"]["seg"], displacement, mode="nearest")
    results = []
    for i in range(displacement.shape[0]):
        rows, transformation = evaluate_pair(batch["fixed"]["seg"][i, 0], warped_seg[i, 0], displacement[i], labels,
                                             voxel_spacing(batch["affine"][i]), batch["fixed"]["mask"][i, 0] > 0)
        dice = [r["dice"] for r in rows if math.isfinite(r["dice"])]
        asd = [r["asd_mm"] for r in rows if math.isfinite(r["asd_mm"])]
        results.append({"dice": float(np.mean(dice)) if dice else math.nan,
                        "asd_mm": float(np.mean(asd)) if asd else math.nan,
                        "folding_percent_mask": transformation["folding_percent_mask"]})
    return results
