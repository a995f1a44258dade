"""Figures of registration results as PNG files: a mid-slice panel per pair and per-structure box plots.

Drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot: no global backend is switched
and nothing is drawn on a screen, so it works on headless machines and inside training. Volumes are numpy arrays
(D, H, W) on the NIfTI array axes; a slice across axis k is shown with the lower remaining axis horizontal and
the higher one vertical (origin at the bottom left), and pixels get the aspect ratio of the voxel spacing.
matplotlib is imported by the functions that draw, so importing this module (or the trainer) does not load it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from utils.io import PathLike, atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
METRIC_TITLES = {"dice": "Dice", "asd_mm": "ASD (mm)", "hd95_mm": "HD95 (mm)"}


def _save(figure: Figure, path: PathLike) -> Path:
    """Render ``figure`` with the Agg canvas and write it atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three central slices of ``volume`` (D, H, W): across axis 0, 1 and 2, each transposed for ``imshow``."""
    volume = np.asarray(volume)
    return [np.take(volume, volume.shape[axis] // 2, axis=axis).T for axis in range(3)]


def _aspects(spacing: Sequence[float]) -> list[float]:
    """imshow aspect (height / width of a pixel) of the slices of ``mid_slices``."""
    return [spacing[b] / spacing[a] for a, b in ((1, 2), (0, 2), (0, 1))]


def pair_panel(path: PathLike, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
               fixed_seg: np.ndarray | None, warped_seg: np.ndarray | None, displacement_mm: np.ndarray,
               uncertainty_mm: np.ndarray | None, det_jacobian: np.ndarray, spacing: Sequence[float],
               labels: Sequence[int] = (), title: str = "") -> Path:
    """Mid-slices in three orientations (rows) of one registered pair (columns).

    Columns: fixed, moving, warped moving, |fixed - moving| (before), |fixed - warped| (after), contours of the
    ``labels`` of the fixed (solid) and warped (dashed) segmentations over the fixed image, displacement magnitude
    (mm), uncertainty (std of the displacement over samples, mm) and det(Jacobian) (blue < 1 < red, 0 and below
    black). Images (D, H, W) in [0, 1]; ``displacement_mm`` (3, D, H, W); segmentations and uncertainty optional.
    """
    from matplotlib.figure import Figure

    magnitude = np.sqrt((np.asarray(displacement_mm, dtype=np.float64) ** 2).sum(0))
    columns = [
        ("fixed", fixed, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
        ("moving", moving, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
        ("warped", warped, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
        ("|F - M| before", np.abs(fixed - moving), {"cmap": "magma", "vmin": 0.0, "vmax": 0.5}),
        ("|F - W| after", np.abs(fixed - warped), {"cmap": "magma", "vmin": 0.0, "vmax": 0.5}),
        ("contours F / W", fixed, {"cmap": "gray", "vmin": 0.0, "vmax": 1.6}),  # darker, for the contours
        ("|u| (mm)", magnitude, {"cmap": "viridis", "vmin": 0.0, "vmax": max(float(magnitude.max()), 1e-6)}),
    ]
    if uncertainty_mm is not None:
        columns.append(("std u (mm)", uncertainty_mm,
                        {"cmap": "inferno", "vmin": 0.0, "vmax": max(float(np.max(uncertainty_mm)), 1e-6)}))
    det_cmap = _det_jacobian_cmap()
    columns.append(("det J", det_jacobian, {"cmap": det_cmap, "vmin": 0.0, "vmax": 2.0}))

    figure = Figure(figsize=(1.9 * len(columns), 6.6), layout="constrained")
    axes = figure.subplots(3, len(columns), squeeze=False)
    aspects = _aspects(spacing)
    seg_slices = [mid_slices(seg) if seg is not None else None for seg in (fixed_seg, warped_seg)]
    colours = _label_colours(len(labels))
    for column, (name, volume, style) in enumerate(columns):
        shown = None
        for row, (image, aspect) in enumerate(zip(mid_slices(volume), aspects)):
            ax = axes[row, column]
            shown = ax.imshow(image, origin="lower", aspect=aspect, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if column == 0:
                ax.set_ylabel(f"across axis {row}", fontsize=8)
            if name.startswith("contours"):
                for segs, linestyle in zip(seg_slices, ("solid", "dashed")):
                    if segs is None:
                        continue
                    for label, colour in zip(labels, colours):
                        region = segs[row] == label
                        if region.any() and not region.all():
                            ax.contour(region.astype(np.float32), levels=[0.5], colors=[colour],
                                       linewidths=0.8, linestyles=linestyle)
        if column >= 3 and not name.startswith("contours"):
            figure.colorbar(shown, ax=axes[:, column], orientation="horizontal", fraction=0.05, pad=0.02)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _det_jacobian_cmap():
    """Diverging map for det J on [0, 2]: blue (compression) - white (1) - red (expansion), black at or below 0."""
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(under="black")


def _label_colours(count: int) -> list:
    """``count`` distinct colours for label contours."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def comparison_boxplots(path: PathLike, results: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                        metrics: Sequence[str] = ("dice", "asd_mm"), title: str = "") -> Path:
    """Box plots per structure (x) and result (colour), one panel per metric, as the paper's result figure.

    ``results``: result name -> structure -> metric -> values (one per pair, or per pair and sample); NaN values
    (missing structures) are left out, and a structure without values leaves an empty slot. Structures are taken
    in the order of their first appearance.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(results)
    if not names:
        raise ValueError("no results to compare")
    structures = list(dict.fromkeys(s for result in results.values() for s in result))
    if not structures:
        raise ValueError("the results hold no structures")
    colours = [_result_colour(i) for i in range(len(names))]
    width = 0.8 / len(names)
    figure = Figure(figsize=(max(6.0, 0.45 * len(structures) * max(len(names), 2) + 1.5), 3.2 * len(metrics)),
                    layout="constrained")
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        for k, (name, colour) in enumerate(zip(names, colours)):
            data, positions = [], []
            for s, structure in enumerate(structures):
                values = np.asarray(results[name].get(structure, {}).get(metric, []), dtype=np.float64)
                values = values[np.isfinite(values)]
                if values.size:
                    data.append(values)
                    positions.append(s + (k - (len(names) - 1) / 2) * width)
            if data:
                boxes = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True,
                                   showfliers=True, flierprops={"markersize": 2})
                for box in boxes["boxes"]:
                    box.set_facecolor(colour)
                    box.set_alpha(0.8)
                for median in boxes["medians"]:
                    median.set_color("black")
        ax.set_xticks(range(len(structures)))
        if ax is axes[-1]:
            ax.set_xticklabels(structures, rotation=45, ha="right", fontsize=8)
        else:
            ax.set_xticklabels([])
        ax.set_xlim(-0.6, len(structures) - 0.4)
        ax.set_ylabel(METRIC_TITLES.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(0.0, 1.0)
    axes[0].legend(handles=[Patch(facecolor=c, label=n) for n, c in zip(names, colours)], loc="best", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _result_colour(index: int):
    """Colour of the ``index``-th compared result."""
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def slice_montage(volume) -> np.ndarray:
    """The three mid-slices of ``volume`` (D, H, W) side by side, min-max scaled to [0, 1], as a (1, H, W) image.

    Rows run top-down (TensorBoard's convention), so each slice is flipped to keep the origin at the bottom left;
    slices are zero-padded at the top to a common height and separated by one zero column. A constant volume
    gives zeros.
    """
    slices = [np.flipud(s).astype(np.float32) for s in mid_slices(volume)]
    low, high = min(float(s.min()) for s in slices), max(float(s.max()) for s in slices)
    slices = [(s - low) / (high - low) if high > low else np.zeros_like(s) for s in slices]
    height = max(s.shape[0] for s in slices)
    padded = []
    for s in slices:
        padded += [np.pad(s, ((height - s.shape[0], 0), (0, 0))), np.zeros((height, 1), np.float32)]
    return np.concatenate(padded[:-1], axis=1)[np.newaxis]
