"""Evaluation metrics of a registration: label overlap, surface distances and Jacobian-based regularity.

Label volumes are integer arrays (D, H, W), numpy or torch, on the NIfTI array axes; ``spacing`` is the voxel
size in mm along those axes. Displacements follow utils.grid: (B, 3, D, H, W), voxel units.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage, stats

HD_PERCENTILE = 95.0  # HD95: numpy's default (linear) interpolation between order statistics of the union
_FACE_CONNECTED = ndimage.generate_binary_structure(3, 1)  # 6-connected structuring element


def _as_label_volume(seg) -> np.ndarray:
    """Integer label volume (D, H, W) as numpy, whether it came as numpy or torch."""
    array = seg.detach().cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D label volume (D, H, W), got shape {array.shape}")
    return array


def _as_mask(det_j: torch.Tensor, mask) -> torch.Tensor:
    """Boolean mask shaped like ``det_j``; everything when ``mask`` is None."""
    if mask is None:
        return torch.ones_like(det_j, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=det_j.device).bool()
    return mask.expand_as(det_j)


def dice(seg_a, seg_b, labels: Sequence[int]) -> np.ndarray:
    """Dice 2 |A n B| / (|A| + |B|) per label (len(labels),); NaN for a label absent from both volumes."""
    seg_a, seg_b = _as_label_volume(seg_a), _as_label_volume(seg_b)
    if seg_a.shape != seg_b.shape:
        raise ValueError(f"label volumes differ in shape: {seg_a.shape} vs {seg_b.shape}")
    scores = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        a, b = seg_a == label, seg_b == label
        total = int(a.sum()) + int(b.sum())
        if total > 0:
            scores[i] = 2.0 * np.logical_and(a, b).sum() / total
    return scores


def contour(region: np.ndarray) -> np.ndarray:
    """Voxels of a boolean region (D, H, W) with a face-neighbour outside it, as SimpleITK's LabelContour.

    As LabelContour (fullyConnected=False), the space beyond the volume border does not count as outside.
    """
    return region & ~ndimage.binary_erosion(region, structure=_FACE_CONNECTED, border_value=1)


def _bounding_box(region: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Slices of the smallest box holding every True voxel of ``region``, grown by ``margin`` within the volume."""
    box = []
    for axis in range(region.ndim):
        indices = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        box.append(slice(max(int(indices[0]) - margin, 0), min(int(indices[-1]) + margin + 1, region.shape[axis])))
    return tuple(box)


def contour_distances(seg_a, seg_b, label: int, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances, mm: from each contour voxel of A to the nearest of B (n_a,), and from B to A (n_b,).

    Contours as in ``contour``; distances run between voxel centres, scaled by ``spacing`` (mm per array axis).
    Both empty when the label misses in either volume.
    """
    seg_a, seg_b = _as_label_volume(seg_a), _as_label_volume(seg_b)
    region_a, region_b = seg_a == label, seg_b == label
    if not region_a.any() or not region_b.any():
        return np.empty(0), np.empty(0)
    # exact on the bounding box of both regions plus one voxel: every contour voxel lies in it, and an edge voxel of
    # the box is outside both regions unless it lies on the volume border, which the box then shares; C order kept
    box = _bounding_box(region_a | region_b, margin=1)
    contour_a, contour_b = contour(region_a[box]), contour(region_b[box])
    spacing = tuple(float(s) for s in spacing)
    # the EDT of the complement gives every voxel its distance to the nearest contour voxel (zero on it)
    a_to_b = ndimage.distance_transform_edt(~contour_b, sampling=spacing)[contour_a]
    b_to_a = ndimage.distance_transform_edt(~contour_a, sampling=spacing)[contour_b]
    return a_to_b, b_to_a


def surface_distances(seg_a, seg_b, label: int, spacing: Sequence[float]) -> tuple[float, float]:
    """ASD and HD95 of one label, in mm, between the contours of A and B; NaN, NaN if it misses in either.

    ASD is the reference's figure, SimpleITK's average Hausdorff distance of the LabelContour images: the mean of
    the two directed mean distances (A to B and B to A), not the mean of the pooled distances. HD95 is the 95th
    percentile (numpy's linear interpolation) of both directed sets pooled; their max is the Hausdorff distance.
    """
    a_to_b, b_to_a = contour_distances(seg_a, seg_b, label, spacing)
    if a_to_b.size == 0:
        return float("nan"), float("nan")
    asd = 0.5 * (float(a_to_b.mean()) + float(b_to_a.mean()))
    return asd, float(np.percentile(np.concatenate([a_to_b, b_to_a]), HD_PERCENTILE))


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + du/dx) (B, D, H, W) of x + u(x); displacement (B, 3, D, H, W), voxel units, array-axis order.

    Derivatives by torch.gradient: central differences inside, one-sided at the border. Voxel units suffice for
    any spacing S = diag(s): in mm the Jacobian is I + S Du S^-1, and det(I + S Du S^-1) = det(I + Du).
    """
    derivatives = torch.gradient(displacement, dim=(2, 3, 4))  # derivatives[j][:, i] = du_i / dx_j
    jacobian = torch.stack(derivatives, dim=-1).permute(0, 2, 3, 4, 1, 5)  # (B, D, H, W, 3 [i], 3 [j])
    identity = torch.eye(3, device=displacement.device, dtype=displacement.dtype)
    return torch.linalg.det(jacobian + identity)


def jacobian_determinant_forward(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + du/dx) (B, D, H, W) by forward differences, as the reference computes it for its folding count.

    displacement (B, 3, D, H, W), voxel units, array-axis order. Each difference array is replicate-padded at the
    far edge (the last difference of an axis is used twice), so the result keeps the volume's size.
    """
    derivatives = []
    for axis in range(2, 5):
        difference = displacement.diff(dim=axis)
        derivatives.append(torch.cat([difference, difference.narrow(axis, -1, 1)], dim=axis))
    jacobian = torch.stack(derivatives, dim=-1).permute(0, 2, 3, 4, 1, 5)  # (B, D, H, W, 3 [i], 3 [j])
    identity = torch.eye(3, device=displacement.device, dtype=displacement.dtype)
    return torch.linalg.det(jacobian + identity)


def folding_reference(det_j: torch.Tensor) -> tuple[int, float]:
    """The reference's folding: number and percentage (0-100) of voxels of the whole volume with det J < 0 (strictly).

    ``det_j`` from ``jacobian_determinant_forward``. The reference counted NaNs of log det J, i.e. det J < 0.
    """
    folded = int((det_j < 0).sum())
    return folded, 100.0 * folded / det_j.numel()


def folding(det_j: torch.Tensor, mask=None) -> tuple[int, float]:
    """Number and percentage (0-100) of voxels with det J <= 0, among those inside ``mask`` (same shape) if given."""
    mask = _as_mask(det_j, mask)
    inside = int(mask.sum())
    folded = int(((det_j <= 0) & mask).sum())
    return folded, 100.0 * folded / inside if inside else float("nan")


def log_jacobian_std(det_j: torch.Tensor, mask=None) -> float:
    """Population standard deviation of log det J over voxels with det J > 0 inside ``mask`` (same shape)."""
    values = det_j[(det_j > 0) & _as_mask(det_j, mask)]
    if values.numel() == 0:
        return float("nan")
    return float(torch.log(values.double()).std(correction=0))


def evaluate_pair(fixed_seg, warped_seg, displacement: torch.Tensor, labels: Mapping[str, int],
                  spacing: Sequence[float], mask=None) -> tuple[list[dict], dict]:
    """Per-structure overlap and surface distances of a warped moving segmentation against the fixed one.

    fixed_seg, warped_seg: (D, H, W) labels; displacement: (1, 3, D, H, W) or (3, D, H, W), voxel units;
    labels: structure name -> label value; mask: (D, H, W), restricts the transformation metrics only.
    Returns (rows, transformation metrics): one row per structure with keys structure, label, dice, asd_mm,
    hd95_mm, present_fixed, present_warped; and the dict of ``transformation_metrics``.
    """
    fixed_seg, warped_seg = _as_label_volume(fixed_seg), _as_label_volume(warped_seg)
    scores = dice(fixed_seg, warped_seg, list(labels.values()))
    rows = []
    for (structure, label), score in zip(labels.items(), scores):
        asd, hd95 = surface_distances(fixed_seg, warped_seg, label, spacing)
        rows.append({"structure": structure, "label": label, "dice": float(score), "asd_mm": asd, "hd95_mm": hd95,
                     "present_fixed": bool((fixed_seg == label).any()),
                     "present_warped": bool((warped_seg == label).any())})
    return rows, transformation_metrics(displacement, mask)


def transformation_metrics(displacement: torch.Tensor, mask=None) -> dict:
    """Regularity of x + u(x), displacement (1, 3, D, H, W) or (3, D, H, W), voxel units; mask (D, H, W) or None.

    ``folding_voxels_mask``, ``folding_percent_mask``: det J <= 0 (central differences) inside ``mask``;
    ``folding_voxels_reference``, ``folding_percent_reference``: the reference's count, det J < 0 (forward
    differences) over the whole volume; ``log_jacobian_std`` over the mask (central differences).
    """
    if displacement.dim() == 4:
        displacement = displacement.unsqueeze(0)
    det_j = jacobian_determinant(displacement)[0]
    folded, folded_percent = folding(det_j, mask)
    folded_reference, folded_reference_percent = folding_reference(jacobian_determinant_forward(displacement)[0])
    return {"folding_voxels_mask": folded, "folding_percent_mask": folded_percent,
            "folding_voxels_reference": folded_reference, "folding_percent_reference": folded_reference_percent,
            "log_jacobian_std": log_jacobian_std(det_j, mask)}


def uncertainty_error_stats(uncertainty, fixed_seg, warped_seg, labels: Sequence[int], mask=None) -> dict:
    """How a voxelwise uncertainty map (e.g. the std of the displacement over samples, mm) relates to label error.

    All arrays (D, H, W) on one grid; voxels outside ``mask`` are ignored. Structures: voxels whose fixed label is
    one of ``labels``; background: the rest of the mask. Error: among voxels where the fixed or the warped label is
    one of ``labels``, those where the two disagree. Returns means of the uncertainty in each set, the fraction in
    disagreement, the point-biserial (Pearson) correlation between uncertainty and disagreement, and the AUC
    P(uncertainty at a disagreeing voxel > at an agreeing one), ties counted half; NaN where a set is empty.
    """
    uncertainty = (uncertainty.detach().cpu().numpy() if isinstance(uncertainty, torch.Tensor)
                   else np.asarray(uncertainty)).astype(np.float64)
    fixed_seg, warped_seg = _as_label_volume(fixed_seg), _as_label_volume(warped_seg)
    inside = np.ones(fixed_seg.shape, bool) if mask is None else _as_label_volume(mask).astype(bool)
    labels = list(labels)
    in_fixed, in_warped = np.isin(fixed_seg, labels), np.isin(warped_seg, labels)
    evaluated = inside & (in_fixed | in_warped)
    disagree = (fixed_seg != warped_seg)[evaluated]
    values = uncertainty[evaluated]

    def mean(selection: np.ndarray) -> float:
        return float(selection.mean()) if selection.size else float("nan")

    correlation = auc = float("nan")
    if 0 < disagree.sum() < disagree.size:
        if values.std() > 0:
            correlation = float(np.corrcoef(values, disagree.astype(np.float64))[0, 1])
        ranks = stats.rankdata(values)  # average ranks: Mann-Whitney U with ties counted half
        n_pos, n_neg = int(disagree.sum()), int((~disagree).sum())
        auc = float((ranks[disagree].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {
        "mean_uncertainty_mask": mean(uncertainty[inside]),
        "mean_uncertainty_structures": mean(uncertainty[inside & in_fixed]),
        "mean_uncertainty_background": mean(uncertainty[inside & ~in_fixed]),
        "mean_uncertainty_disagreement": mean(values[disagree]),
        "mean_uncertainty_agreement": mean(values[~disagree]),
        "disagreement_fraction": mean(disagree.astype(np.float64)),
        "uncertainty_disagreement_correlation": correlation,
        "uncertainty_disagreement_auc": auc,
    }
