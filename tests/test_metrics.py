"""Metrics against SimpleITK's filters, analytic truths and an independent numpy Jacobian."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from utils.metrics import (contour, contour_distances, dice, evaluate_pair, folding, folding_reference,
                           jacobian_determinant, jacobian_determinant_forward, log_jacobian_std, surface_distances)

SHAPE = (24, 28, 32)
SPACING = (1.0, 1.5, 2.0)  # mm along array axes 0, 1, 2; SimpleITK wants it reversed (x, y, z)
MARGIN = 2  # labels off the border (tests at the border are separate)


def blobby_pair(seed: int, no_labels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping but different label maps SHAPE with labels 1..no_labels, zero in a MARGIN-voxel border."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(SHAPE)
    fields = [ndimage.gaussian_filter(common + 0.7 * rng.standard_normal(SHAPE), sigma=2.5) for _ in range(2)]
    thresholds = np.quantile(fields[0], np.linspace(0.0, 1.0, no_labels + 2)[1:-1])
    segs = []
    for field in fields:
        seg = np.digitize(field, thresholds).astype(np.int16)  # 0 .. no_labels
        border = np.ones(SHAPE, bool)
        border[MARGIN:-MARGIN, MARGIN:-MARGIN, MARGIN:-MARGIN] = False
        seg[border] = 0
        segs.append(seg)
    return segs[0], segs[1]


def to_sitk(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    """numpy (D, H, W) -> sitk image (x = W, y = H, z = D) with the spacing reversed to match."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    return image


def sitk_average_hausdorff(seg_a, seg_b, label, spacing=SPACING) -> float:
    """The reference's ASD: SimpleITK's HausdorffDistanceImageFilter on the two LabelContour images."""
    contours = [sitk.LabelContour(to_sitk((seg == label).astype(np.uint8), spacing)) for seg in (seg_a, seg_b)]
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(contours[0], contours[1])
    return hausdorff.GetAverageHausdorffDistance()


def sitk_contour_distances(seg_a, seg_b, label, spacing=SPACING) -> tuple[np.ndarray, np.ndarray, float]:
    """Independent directed contour distances (A to B, B to A) and the contours' Hausdorff distance by SimpleITK.

    LabelContour(fullyConnected=False) marks the voxels with a face-neighbour outside the label; the absolute
    SignedMaurerDistanceMap of a contour image is the distance to the nearest contour voxel centre (0 on it).
    """
    contours = [sitk.LabelContour(to_sitk((seg == label).astype(np.uint8), spacing), fullyConnected=False)
                for seg in (seg_a, seg_b)]
    masks = [sitk.GetArrayFromImage(c) > 0 for c in contours]
    maps = [np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        c, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))) for c in contours]
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(contours[0], contours[1])
    return maps[1][masks[0]], maps[0][masks[1]], hausdorff.GetHausdorffDistance()


def cube(shape=SHAPE, start=(6, 7, 8), size=10, shift=(0, 0, 0)) -> np.ndarray:
    """Label map with a cube of label 1, corner ``start`` + ``shift``, edge ``size`` voxels."""
    seg = np.zeros(shape, np.int16)
    lo = [s + k for s, k in zip(start, shift)]
    seg[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = 1
    return seg


def affine_displacement(matrix: np.ndarray, translation, shape=(7, 8, 9)) -> torch.Tensor:
    """u(x) = (A - I) x + t on the voxel grid, (1, 3, D, H, W) float64, array-axis order."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    u = np.einsum("ij,j...->i...", matrix - np.eye(3), x) + np.reshape(translation, (3, 1, 1, 1))
    return torch.from_numpy(u).unsqueeze(0)


# ---- Dice -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_sitk_label_overlap(seed):
    seg_a, seg_b = blobby_pair(seed)
    seg_b[seg_b == 4] = 0  # label 4 only in A -> 0
    labels = [1, 2, 3, 4, 7]  # label 7 in neither -> NaN (SimpleITK warns and says 0)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(to_sitk(seg_a), to_sitk(seg_b))
    expected = [overlap.GetDiceCoefficient(label) for label in labels[:-1]]

    scores = dice(seg_a, seg_b, labels)
    assert scores.shape == (len(labels),)
    np.testing.assert_allclose(scores[:-1], expected, rtol=1e-12)
    assert scores[3] == 0.0
    assert np.isnan(scores[4])
    assert 0.1 < scores[:3].min() and scores[:3].max() < 0.99  # the blobs overlap, but not trivially
    np.testing.assert_array_equal(dice(torch.from_numpy(seg_a), torch.from_numpy(seg_b), labels), scores)


def test_dice_identical_is_one():
    seg, _ = blobby_pair(3)
    np.testing.assert_array_equal(dice(seg, seg, [1, 2, 3, 4]), np.ones(4))


# ---- surface distances ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", [1, 2, 4])
def test_contour_matches_sitk_label_contour(label):
    seg, _ = blobby_pair(0)
    expected = sitk.GetArrayFromImage(sitk.LabelContour(to_sitk((seg == label).astype(np.uint8)),
                                                        fullyConnected=False)) > 0
    np.testing.assert_array_equal(contour(seg == label), expected)


def test_contour_at_the_volume_border_is_sitk_label_contour():
    """LabelContour does not count the space beyond the border as outside: a slab on the border has one face."""
    slab = np.zeros((6, 7, 8), bool)
    slab[:3] = True
    expected = sitk.GetArrayFromImage(sitk.LabelContour(to_sitk(slab.astype(np.uint8)))) > 0
    np.testing.assert_array_equal(contour(slab), expected)
    assert contour(slab).sum() == 7 * 8 and contour(slab)[2].all()
    assert not contour(np.ones((5, 6, 7), bool)).any()


@pytest.mark.parametrize("seed,label", [(0, 1), (0, 3), (1, 2), (1, 4)])
def test_surface_distances_match_sitk(seed, label):
    seg_a, seg_b = blobby_pair(seed)
    a_to_b, b_to_a, hausdorff = sitk_contour_distances(seg_a, seg_b, label)
    union = np.concatenate([a_to_b, b_to_a]).astype(np.float64)

    ours_a_to_b, ours_b_to_a = contour_distances(seg_a, seg_b, label, SPACING)
    np.testing.assert_allclose(ours_a_to_b, a_to_b, rtol=1e-6, atol=1e-5)  # Maurer maps are float32
    np.testing.assert_allclose(ours_b_to_a, b_to_a, rtol=1e-6, atol=1e-5)
    distances = np.concatenate([ours_a_to_b, ours_b_to_a])
    asd, hd95 = surface_distances(seg_a, seg_b, label, SPACING)
    assert asd == pytest.approx(sitk_average_hausdorff(seg_a, seg_b, label), rel=1e-6)
    assert asd == pytest.approx(0.5 * (a_to_b.mean() + b_to_a.mean()), rel=1e-6)
    assert abs(asd - union.mean()) > 1e-5 * asd  # the mean of the directed means, not of the pooled distances
    assert hd95 == pytest.approx(np.percentile(union, 95), rel=1e-6)
    assert distances.max() == pytest.approx(hausdorff, rel=1e-6)
    assert 0.0 < asd < hd95 <= distances.max()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.3, 3.3, 3.3), (0.8, 2.5, 1.7)])
def test_asd_is_sitk_average_hausdorff_at_the_border_and_any_spacing(spacing):
    """Labels that touch the volume border and an anisotropic spacing: still SimpleITK's figure."""
    seg_a, seg_b = blobby_pair(4, no_labels=2)
    seg_a[:3, 5:12, 6:14], seg_b[:2, 6:13, 6:15] = 1, 1  # label 1 reaches the border in both
    for label in (1, 2):
        asd, _ = surface_distances(seg_a, seg_b, label, spacing)
        assert asd == pytest.approx(sitk_average_hausdorff(seg_a, seg_b, label, spacing), rel=1e-6)


def test_asd_is_the_mean_of_the_two_directed_means():
    """A small cube inside a big one: 98 contour voxels at 3 voxels from the big contour, 488 big-contour voxels at
    3 voxels or more from the small one; the pooled mean would weight the big contour 5x more."""
    big, small = cube(size=10), cube(start=(9, 10, 11), size=4)
    a_to_b, b_to_a = contour_distances(big, small, 1, (1.0, 1.0, 1.0))
    assert a_to_b.size == 10 ** 3 - 8 ** 3 and b_to_a.size == 4 ** 3 - 2 ** 3
    np.testing.assert_allclose(b_to_a, 3.0)
    asd, _ = surface_distances(big, small, 1, (1.0, 1.0, 1.0))
    assert asd == pytest.approx(0.5 * (a_to_b.mean() + 3.0))
    assert asd == pytest.approx(sitk_average_hausdorff(big, small, 1, (1.0, 1.0, 1.0)), rel=1e-6)
    assert asd < np.concatenate([a_to_b, b_to_a]).mean() - 0.1


def test_surface_distances_identical_are_zero():
    seg, _ = blobby_pair(2)
    assert surface_distances(seg, seg, 1, SPACING) == (0.0, 0.0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube_hausdorff_is_shift_times_spacing(axis, k):
    shift = [0, 0, 0]
    shift[axis] = k
    distances = np.concatenate(contour_distances(cube(), cube(shift=tuple(shift)), 1, SPACING))
    assert distances.max() == pytest.approx(k * SPACING[axis])
    asd, hd95 = surface_distances(cube(), cube(shift=tuple(shift)), 1, SPACING)
    assert 0.0 < asd < hd95 <= k * SPACING[axis] + 1e-12


def test_surface_distances_missing_label_is_nan():
    seg = cube()
    assert all(np.isnan(surface_distances(seg, np.zeros_like(seg), 1, SPACING)))
    assert all(np.isnan(surface_distances(np.zeros_like(seg), seg, 1, SPACING)))


# ---- Jacobian determinant ---------------------------------------------------------------------------------------

ROTATION = np.array([[np.cos(0.4), -np.sin(0.4), 0.0], [np.sin(0.4), np.cos(0.4), 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("matrix", [
    np.eye(3),
    np.diag([1.2, 0.8, 1.5]),
    np.array([[1.0, 0.3, -0.2], [0.0, 0.9, 0.4], [0.1, 0.0, 1.1]]),
    ROTATION @ np.diag([0.7, 1.3, 1.0]),
], ids=["identity", "scaling", "shear", "rotation-scaling"])
def test_jacobian_of_affine_is_det_a(matrix):
    det_j = jacobian_determinant(affine_displacement(matrix, (0.5, -1.0, 2.0)))
    assert det_j.shape == (1, 7, 8, 9)
    torch.testing.assert_close(det_j, torch.full_like(det_j, np.linalg.det(matrix)), rtol=1e-10, atol=1e-10)
    assert folding(det_j) == (0, 0.0)


@pytest.mark.parametrize("matrix", [np.diag([-1.0, 1.0, 1.0]), ROTATION @ np.diag([1.0, 1.0, -0.5])],
                         ids=["mirror", "rotation-mirror"])
def test_reflection_folds_every_voxel(matrix):
    det_j = jacobian_determinant(affine_displacement(matrix, (0.0, 0.0, 0.0)))
    torch.testing.assert_close(det_j, torch.full_like(det_j, np.linalg.det(matrix)), rtol=1e-10, atol=1e-10)
    assert folding(det_j) == (det_j.numel(), 100.0)
    assert np.isnan(log_jacobian_std(det_j))


def test_zero_displacement_has_unit_jacobian():
    det_j = jacobian_determinant(torch.zeros(2, 3, 5, 6, 7))
    torch.testing.assert_close(det_j, torch.ones(2, 5, 6, 7))


def test_jacobian_matches_numpy_gradient():
    rng = np.random.default_rng(0)
    fields = 20.0 * ndimage.gaussian_filter(rng.standard_normal((2, 3, 10, 12, 14)), sigma=(0, 0, 2, 2, 2))
    expected = np.empty((2, 10, 12, 14))
    for b, u in enumerate(fields):
        jacobian = np.stack([np.stack(np.gradient(u[i]), axis=-1) for i in range(3)], axis=-2)  # [..., i, j]
        expected[b] = np.linalg.det(jacobian + np.eye(3))
    det_j = jacobian_determinant(torch.from_numpy(fields))
    np.testing.assert_allclose(det_j.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert np.ptp(expected) > 0.5 and (expected <= 0).any()  # a field that really varies, and folds


def reference_det_j(displacement: np.ndarray) -> np.ndarray:
    """Transcription of the reference's det J: forward differences of the transformation, each difference array
    edge-padded at the far end (F.pad replicate), then the 3x3 determinant written out."""
    jacobian = np.empty(displacement.shape[1:] + (3, 3))
    for j in range(3):
        pad = [(0, 0)] * 4
        pad[j + 1] = (0, 1)
        jacobian[..., j] = np.moveaxis(np.pad(np.diff(displacement, axis=j + 1), pad, mode="edge"), 0, -1)
    return np.linalg.det(jacobian + np.eye(3))


def test_forward_jacobian_matches_the_reference_transcription():
    rng = np.random.default_rng(1)
    field = 20.0 * ndimage.gaussian_filter(rng.standard_normal((3, 10, 12, 14)), sigma=(0, 2, 2, 2))
    det_j = jacobian_determinant_forward(torch.from_numpy(field).unsqueeze(0))[0]
    expected = reference_det_j(field)
    np.testing.assert_allclose(det_j.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert folding_reference(det_j) == (int((expected < 0).sum()), 100.0 * (expected < 0).sum() / expected.size)
    assert 0 < (expected < 0).sum() < expected.size
    affine = affine_displacement(np.array([[1.0, 0.3, -0.2], [0.0, 0.9, 0.4], [0.1, 0.0, 1.1]]), (0.5, 0, 1))
    torch.testing.assert_close(jacobian_determinant_forward(affine), jacobian_determinant(affine))


def test_reference_folding_is_strict_and_over_the_whole_volume():
    det_j = torch.ones(5, 6, 7, dtype=torch.float64)
    det_j[0, 0, :3] = 0.0  # det J = 0: not counted by the reference (log 0 = -inf, not NaN)
    det_j[4, 5, :2] = -1e-6
    assert folding_reference(det_j) == (2, 100.0 * 2 / 210)


def test_forward_jacobian_uses_the_last_difference_twice():
    displacement = torch.zeros(1, 3, 6, 4, 4, dtype=torch.float64)
    displacement[0, 0, 5] = -3.0  # the last difference along axis 0 is -3: det -2 at slices 4 and 5 (padding)
    det_j = jacobian_determinant_forward(displacement)[0]
    assert (det_j[4:] == -2.0).all() and (det_j[:4] == 1.0).all()
    assert folding_reference(det_j)[0] == 2 * 4 * 4


# ---- folding and log-Jacobian std -------------------------------------------------------------------------------

def test_folding_and_log_jacobian_std_with_mask():
    det_j = torch.full((1, 4, 4, 4), 1.0, dtype=torch.float64)
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:2] = True  # 32 voxels
    det_j[0, 0, 0, :2] = np.e  # inside
    det_j[0, 0, 1, :2] = np.exp(-1.0)  # inside
    det_j[0, 1, 0, 0] = 0.0  # inside, folded (det = 0 counts)
    det_j[0, 1, 0, 1] = -0.5  # inside, folded
    det_j[0, 3, :, :] = -2.0  # outside, folded: 16 voxels
    det_j[0, 2, 0, 0] = 100.0  # outside

    assert folding(det_j, mask) == (2, 100.0 * 2 / 32)
    assert folding(det_j, mask.numpy()) == (2, 100.0 * 2 / 32)
    assert folding(det_j) == (18, 100.0 * 18 / 64)
    logs = np.log(np.r_[[np.e] * 2, [np.exp(-1.0)] * 2, [1.0] * 26])  # the 30 positive voxels inside
    assert log_jacobian_std(det_j, mask) == pytest.approx(np.std(logs))
    inside_all = det_j[det_j > 0].log()
    assert log_jacobian_std(det_j) == pytest.approx(float(inside_all.std(correction=0)))


# ---- evaluate_pair ----------------------------------------------------------------------------------------------

def test_evaluate_pair_rows_and_transformation_metrics():
    fixed = cube() + 2 * cube(start=(2, 2, 2), size=3)
    warped = cube(shift=(0, 2, 0))
    labels = {"cube": 1, "corner": 2, "absent": 5}
    displacement = affine_displacement(np.diag([-1.0, 1.0, 1.0]), (0.0, 0.0, 0.0), shape=SHAPE)[0]
    displacement[:, 6:] = 0.0  # reflection along axis 0 in slabs 0..5; slab 5 sees a jump, slabs 0..4 fold
    mask = np.zeros(SHAPE, bool)
    mask[:4] = True  # folded
    mask[10:13] = True  # identity

    rows, transformation = evaluate_pair(fixed, warped, displacement, labels, SPACING, mask=mask)
    assert [row["structure"] for row in rows] == ["cube", "corner", "absent"]
    cube_row, corner_row, absent_row = rows
    assert cube_row["label"] == 1 and cube_row["present_fixed"] and cube_row["present_warped"]
    assert cube_row["dice"] == pytest.approx(0.8)
    asd, hd95 = surface_distances(fixed, warped, 1, SPACING)
    assert (cube_row["asd_mm"], cube_row["hd95_mm"]) == (asd, hd95)
    assert corner_row["present_fixed"] and not corner_row["present_warped"]
    assert corner_row["dice"] == 0.0 and np.isnan(corner_row["asd_mm"]) and np.isnan(corner_row["hd95_mm"])
    assert not absent_row["present_fixed"] and not absent_row["present_warped"] and np.isnan(absent_row["dice"])
    folded = 4 * SHAPE[1] * SHAPE[2]
    assert transformation["folding_voxels_mask"] == folded
    assert transformation["folding_percent_mask"] == pytest.approx(100.0 * 4 / 7)
    # forward differences: u_0(x + 1) - u_0(x) = -2 for x = 0..4, +10 at x = 5: five slabs, whole volume
    assert transformation["folding_voxels_reference"] == 5 * SHAPE[1] * SHAPE[2]
    assert transformation["folding_percent_reference"] == pytest.approx(100.0 * 5 / SHAPE[0])
    assert transformation["log_jacobian_std"] == 0.0
