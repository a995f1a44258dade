"""The embedded demo dataset: brain-like phantoms, generated in a few seconds, nothing downloaded.

A template "brain" (ellipsoidal mask, cortex-like shell, white matter, ventricles and bilateral subcortical
structures with FreeSurfer label ids, each label its own intensity, mild smooth texture) is deformed for each
subject by a random smooth diffeomorphism (a Gaussian-smoothed random velocity field integrated by scaling and
squaring); sub-01 is the template itself and the atlas of every pair. Layout as the real data: ``sub-XX/{im, mask,
seg}.nii.gz``, ``pairs.csv`` (fixed,moving) and ``labels.json`` (evaluation structures -> label ids).

    python -m data_loader.demo OUT_DIR [--size N --subjects K --seed S]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from utils.flow import integrate_velocity, warp
from utils.io import TMP_PREFIX, PathLike, atomic_write_text, save_nifti

VOXEL_SIZE_MM = 2.0
# shapes in normalised coordinates [-1, 1] of the field of view; axis 0 left -> right, 1 posterior -> anterior,
# 2 inferior -> superior (RAS-like). Bilateral entries are mirrored: (left id, right id), centre given for the left.
BRAIN = {"centre": (0.0, 0.0, 0.08), "radii": (0.72, 0.86, 0.7)}
WHITE_MATTER = {"labels": (2, 41), "intensity": 0.85}
CORTEX = {"labels": (3, 42), "intensity": 0.5, "depth": 0.2}  # outer fraction of the brain radius
VENTRICLES = {"labels": (4, 43), "centre": (-0.09, 0.05, 0.2), "radii": (0.07, 0.3, 0.1), "intensity": 0.1}
STRUCTURES = {
    "thalamus": {"labels": (10, 49), "centre": (-0.15, -0.12, 0.02), "radii": (0.12, 0.17, 0.13),
                 "intensity": 0.7},
    "caudate": {"labels": (11, 50), "centre": (-0.2, 0.24, 0.2), "radii": (0.1, 0.18, 0.12), "intensity": 0.58},
    "putamen": {"labels": (12, 51), "centre": (-0.37, 0.04, 0.02), "radii": (0.1, 0.22, 0.14), "intensity": 0.64},
    "hippocampus": {"labels": (17, 53), "centre": (-0.33, -0.26, -0.26), "radii": (0.1, 0.22, 0.1),
                    "intensity": 0.34},
    "brain_stem": {"labels": (16,), "centre": (0.0, -0.15, -0.5), "radii": (0.13, 0.13, 0.3), "intensity": 0.78},
}
TEXTURE_SD = 0.03  # smooth multiplicative texture of the template
VELOCITY_SMOOTHING = 1 / 6  # Gaussian sigma of the random velocity, as a fraction of the image size
VELOCITY_RMS = 0.02  # root mean square of the velocity inside the field of view, as a fraction of the image size
GAMMA_RANGE = 0.1  # per-subject intensity gamma in [1 - r, 1 + r]
BIAS_SD = 0.04  # per-subject smooth multiplicative bias field
NOISE_SD = 0.01  # per-subject white noise


def structure_labels() -> dict[str, int]:
    """Evaluation structures of the demo (name -> FreeSurfer label id), named as the project's labels.json."""
    labels = {}
    for name, spec in STRUCTURES.items():
        if len(spec["labels"]) == 1:
            labels[name] = spec["labels"][0]
        else:
            labels[f"left_{name}"], labels[f"right_{name}"] = spec["labels"]
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def demo_affine(size: int) -> np.ndarray:
    """Voxel-to-world affine: isotropic 2 mm, RAS-like axes, field of view centred on the world origin."""
    affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_SIZE_MM * (size - 1) / 2
    return affine


def _ellipsoid_radius(coords: np.ndarray, centre, radii) -> np.ndarray:
    """Normalised ellipsoidal radius (< 1 inside) at every voxel; coords (3, D, H, W)."""
    return np.sqrt(sum(((coords[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3)))


def make_template(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Template (image float32 in [0, 1], segmentation int16) of shape (size,) * 3."""
    coords = np.stack(np.meshgrid(*[np.linspace(-1.0, 1.0, size)] * 3, indexing="ij"))
    left = coords[0] < 0
    seg = np.zeros((size,) * 3, dtype=np.int16)
    intensity = {0: 0.0}

    def paint(region: np.ndarray, labels: tuple[int, ...], value: float) -> None:
        """Give ``region`` the left/right label by hemisphere (a single label for midline structures)."""
        seg[region & left] = labels[0]
        seg[region & ~left] = labels[-1]
        intensity.update({label: value for label in labels})

    brain_radius = _ellipsoid_radius(coords, BRAIN["centre"], BRAIN["radii"])
    paint(brain_radius <= 1.0, CORTEX["labels"], CORTEX["intensity"])
    paint(brain_radius <= 1.0 - CORTEX["depth"], WHITE_MATTER["labels"], WHITE_MATTER["intensity"])
    for spec in [VENTRICLES, *STRUCTURES.values()]:
        centre = np.asarray(spec["centre"])
        region = _ellipsoid_radius(coords, centre, spec["radii"]) <= 1.0
        if len(spec["labels"]) == 2:  # mirror the left structure to the right hemisphere
            region |= _ellipsoid_radius(coords, centre * [-1, 1, 1], spec["radii"]) <= 1.0
        paint(region, spec["labels"], spec["intensity"])

    lookup = np.zeros(int(seg.max()) + 1, dtype=np.float64)
    for label, value in intensity.items():
        lookup[label] = value
    texture = gaussian_filter(rng.standard_normal(seg.shape), sigma=size / 16)
    texture *= TEXTURE_SD / texture.std()
    im = lookup[seg] * (1.0 + texture)
    im = gaussian_filter(im, sigma=0.5) * (seg > 0)  # a little partial volume, zero outside the brain
    return np.clip(im, 0.0, 1.0).astype(np.float32), seg


def random_displacement(size: int, rng: np.random.Generator) -> torch.Tensor:
    """Displacement (1, 3, D, H, W), voxel units, of exp(v) for a random Gaussian-smoothed velocity v."""
    velocity = np.stack([gaussian_filter(rng.standard_normal((size,) * 3), sigma=size * VELOCITY_SMOOTHING,
                                         mode="wrap") for _ in range(3)])
    velocity *= VELOCITY_RMS * size / np.sqrt(np.mean(velocity ** 2))
    return integrate_velocity(torch.from_numpy(velocity).unsqueeze(0))


def make_subject(template_im: np.ndarray, template_seg: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The template deformed by a random diffeomorphism, with small intensity variation: (image, segmentation)."""
    size = template_im.shape[0]
    displacement = random_displacement(size, rng)
    im = warp(torch.from_numpy(template_im.astype(np.float64))[None, None], displacement)[0, 0].numpy()
    seg = warp(torch.from_numpy(template_seg)[None, None], displacement, mode="nearest")[0, 0].numpy()
    gamma = rng.uniform(1.0 - GAMMA_RANGE, 1.0 + GAMMA_RANGE)
    bias = gaussian_filter(rng.standard_normal(im.shape), sigma=size / 4)
    bias *= BIAS_SD / bias.std()
    im = np.clip(im, 0.0, 1.0) ** gamma * (1.0 + bias) + NOISE_SD * rng.standard_normal(im.shape)
    return (np.clip(im, 0.0, 1.0) * (seg > 0)).astype(np.float32), seg


def make_demo_dataset(path: PathLike, no_subjects: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Write the demo dataset into ``path`` (sub-01 = atlas = template, sub-02.. deformed copies); deterministic."""
    if no_subjects < 2:
        raise ValueError(f"no_subjects must be >= 2 (an atlas and a moving image), got {no_subjects}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    path = Path(path)
    affine = demo_affine(size)
    template_im, template_seg = make_template(size, np.random.default_rng([seed, 0]))
    ids = [f"sub-{k:02d}" for k in range(1, no_subjects + 1)]
    for k, subject in enumerate(ids):
        if k == 0:
            im, seg = template_im, template_seg
        else:
            im, seg = make_subject(template_im, template_seg, np.random.default_rng([seed, k]))
        save_nifti(path / subject / "im.nii.gz", im, affine, dtype=np.float32)
        save_nifti(path / subject / "mask.nii.gz", seg > 0, affine, dtype=np.uint8)
        save_nifti(path / subject / "seg.nii.gz", seg, affine, dtype=np.int16)
    atomic_write_text(path / "pairs.csv", "".join(f"{ids[0]},{moving}\n" for moving in ids[1:]))
    atomic_write_text(path / "labels.json", json.dumps(structure_labels(), indent=2) + "\n")
    return path


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_builds(path: Path) -> None:
    """Remove the temporary build folders of ``path`` that killed processes left behind (live builders' are kept)."""
    pattern = re.compile(rf"{re.escape(TMP_PREFIX)}(?P<pid>\d+)-[0-9a-f]{{32}}-{re.escape(path.name)}")
    for tmp in path.parent.glob(f"{TMP_PREFIX}*-{path.name}"):
        match = pattern.fullmatch(tmp.name)
        if match and not _process_alive(int(match["pid"])):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_dataset(path: PathLike, **params) -> Path:
    """Create the demo dataset at ``path`` unless it exists; built in a temporary sibling, then renamed into place.

    The sibling's name holds the builder's process ID, so the next build removes those of killed processes.
    """
    path = Path(path)
    if path.parent.is_dir():
        remove_stale_builds(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{path.name}"
    try:
        make_demo_dataset(tmp, **params)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():  # not a concurrent creator that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: create the demo dataset in OUT_DIR (left alone if it exists)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="dataset folder to create")
    parser.add_argument("--size", type=int, default=32, help="image side in voxels (default 32)")
    parser.add_argument("--subjects", type=int, default=8, help="number of subjects incl. the atlas (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    existed = args.out_dir.exists()
    ensure_demo_dataset(args.out_dir, no_subjects=args.subjects, size=args.size, seed=args.seed)
    print(f"{args.out_dir}: {'exists, left unchanged' if existed else 'demo dataset created'}")


if __name__ == "__main__":
    main()
