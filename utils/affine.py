"""Affine pre-alignment with SimpleITK's registration framework, and ITK/ANTs affine transform files.

Every transform here follows ITK's convention: it maps a point of the fixed image (LPS mm) to the point of the
moving image that is sampled there, as antsRegistration's ``0GenericAffine.mat`` does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from utils.io import PathLike, atomic_write

AFFINE_METRICS = ("mattes", "correlation")  # Mattes mutual information (any contrasts), or correlation (same)
SHRINK_FACTORS = (4, 2, 1)  # the resolution levels of each stage, coarse to fine ...
SMOOTHING_SIGMAS = (2.0, 1.0, 0.0)  # ... with Gaussian smoothing per level, in voxels of the fixed image
MIN_LEVEL_SIZE = 32  # ... keeping the levels that leave at least this many voxels along every axis (and 1)
SAMPLING_PERCENTAGE = 0.2  # of the fixed image's voxels (or mask voxels), drawn at random with SEED
SEED = 1  # not 0: SimpleITK takes a seed of 0 (sitkWallClock) to mean a new seed from the clock on every run
TRANSFORM_SUFFIXES = (".mat", ".tfm", ".txt")


def _method(metric: str, fixed_mask: sitk.Image | None, iterations: int, size: Sequence[int]
            ) -> sitk.ImageRegistrationMethod:
    if metric not in AFFINE_METRICS:
        raise ValueError(f"affine metric must be one of {AFFINE_METRICS}, got {metric!r}")
    method = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, SEED)
    if fixed_mask is not None:
        method.SetMetricFixedMask(sitk.Cast(fixed_mask > 0, sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    levels = [(f, s) for f, s in zip(SHRINK_FACTORS, SMOOTHING_SIGMAS) if f == 1 or min(size) // f >= MIN_LEVEL_SIZE]
    method.SetShrinkFactorsPerLevel([f for f, _ in levels])
    method.SetSmoothingSigmasPerLevel([s for _, s in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def as_affine(transform: sitk.Transform, source: str = "transform") -> sitk.AffineTransform:
    """A 3D affine transform equal to ``transform`` (any linear ITK transform, or a composite of exactly one)."""
    if transform.GetDimension() != 3:
        raise ValueError(f"{source}: expected a 3D transform, got {transform.GetDimension()}D")
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        if transform.GetNumberOfTransforms() != 1:
            raise ValueError(f"{source}: a composite of {transform.GetNumberOfTransforms()} transforms, not one "
                             f"affine transform")
        transform = transform.GetNthTransform(0).Downcast()
    affine = sitk.AffineTransform(3)
    if isinstance(transform, sitk.TranslationTransform):
        affine.SetTranslation(transform.GetOffset())
    elif hasattr(transform, "GetMatrix") and hasattr(transform, "GetTranslation"):
        affine.SetCenter(transform.GetCenter())
        affine.SetMatrix(transform.GetMatrix())
        affine.SetTranslation(transform.GetTranslation())
    else:
        raise ValueError(f"{source}: a {transform.GetName()}, not an affine transform")
    matrix = np.reshape(affine.GetMatrix(), (3, 3))
    values = np.concatenate([matrix.ravel(), affine.GetTranslation(), affine.GetCenter()])
    if not np.isfinite(values).all() or np.linalg.matrix_rank(matrix) < 3:
        raise ValueError(f"{source}: the affine transform is singular or not finite (matrix "
                         f"{np.array2string(matrix, precision=3, separator=',').replace(chr(10), '')})")
    return affine


def affine_register(fixed: sitk.Image, moving: sitk.Image, metric: str = "mattes",
                    fixed_mask: sitk.Image | None = None, initial: sitk.Transform | None = None,
                    iterations: int = 200) -> sitk.AffineTransform:
    """The affine transform (fixed -> moving points) that aligns ``moving`` to ``fixed``.

    Two stages on the SHRINK_FACTORS / SMOOTHING_SIGMAS levels that fit the image, each optimised by regular-step
    gradient descent with scales from physical shifts: rigid (Euler) then affine, started from ``initial`` or, without one, from the
    moments initialiser (centres of mass aligned, principal axes kept). ``metric``: "mattes" (Mattes mutual
    information, 32 bins) or "correlation"; sampled at random (SEED) inside ``fixed_mask`` when given.
    """
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    if initial is None:
        rigid = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
        method = _method(metric, fixed_mask, iterations, fixed.GetSize())
        method.SetInitialTransform(rigid, inPlace=True)
        method.Execute(fixed, moving)
        start = as_affine(rigid)
    else:
        start = as_affine(initial, "initial transform")
    method = _method(metric, fixed_mask, iterations, fixed.GetSize())
    method.SetInitialTransform(start, inPlace=True)
    method.Execute(fixed, moving)
    return start


def read_affine(path: PathLike) -> sitk.AffineTransform:
    """An ITK or ANTs affine transform file (.mat, .tfm, .txt) as a 3D affine transform; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transform file not found: {path}")
    if not path.name.lower().endswith(TRANSFORM_SUFFIXES):
        raise ValueError(f"{path}: expected an ITK/ANTs affine transform file ({', '.join(TRANSFORM_SUFFIXES)})")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise ValueError(f"cannot read transform file {path}: not an ITK/ANTs transform file") from None
    return as_affine(transform, str(path))


def write_affine(path: PathLike, transform: sitk.Transform) -> Path:
    """Write an affine transform atomically; the extension chooses the format (.mat: ANTs' MATLAB file)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


def identity_affine() -> sitk.AffineTransform:
    """The identity as an affine transform (``--affine none`` without an initial transform)."""
    return sitk.AffineTransform(3)
