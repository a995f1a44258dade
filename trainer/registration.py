"""Register two images: ``register(fixed, moving, ...)``, the Python API that register.py is a command line for.

One registration: an affine step (SimpleITK's registration framework, or a given ITK/ANTs affine), then q_v
inference (baseline or learnt metric; coarse to fine by default on the CPU) or one VoxelMorph forward pass on the
working grid, between the fixed image and the moving image resampled through the affine transform. The result is
one transformation, fixed -> moving points, T(p) = A(p + w(p)) with A the affine and w the non-rigid displacement
(the posterior mean's), both on the fixed image's full grid: written as ANTs writes its results (an affine .mat and
a displacement field), and applied once, to the original moving image and segmentation, for the outputs. Dice and
surface distances are measured on those outputs.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from data_loader.dataset import load_labels
from data_loader.geometry import displacement_to_input_world, resample_to_input, working_affine
from data_loader.images import read_image, read_image_header, write_image
from model.variational import QV
from model.voxelmorph import VxmDense
from trainer.build import build_energy, build_similarity
from trainer.checkpoint import (holds_voxelmorph, is_pretrained_model, load_checkpoint, load_similarity,
                                load_voxelmorph, similarity_from_checkpoint)
from trainer.evaluation import ROW_FIELDS, RunningMoments, metric_rows, sample_displacements, voxel_spacing
from trainer.finite import check_pairs_finite
from trainer.pair_inputs import ImageInput, PairInputs, describe, image_like
from trainer.pretrained import resolve_checkpoint
from trainer.q_v_inference import infer_q_v, infer_q_v_pyramid
from trainer.registration_config import DEFAULT_MODEL, base_config, registration_config, vxm_registration_config
from trainer.vxm_tester import check_input_shape
from utils.affine import AFFINE_METRICS, affine_register, identity_affine, read_affine, write_affine
from utils.config import ConfigError, QVTestConfig, RunConfig
from utils.io import atomic_write, atomic_write_text
from utils.itk import (array_from_image, image_from_array, itk_displacement_field, itk_from_affine,
                       read_displacement_transform, resample, write_sitk)
from utils.metrics import jacobian_determinant

# output names, after the prefix (ANTs' names for the transforms, so that its users find them)
WARPED_IM, WARPED_SEG = "warped_im.nii.gz", "warped_seg.nii.gz"
AFFINE = "0GenericAffine.mat"  # fixed -> moving points, ITK's MATLAB format, as antsRegistration writes it
WARP, INVERSE_WARP = "1Warp.nii.gz", "1InverseWarp.nii.gz"  # the non-rigid part and its inverse, LPS mm
DISPLACEMENT_ITK = "displacement_itk.nii.gz"  # the whole transformation as one ITK displacement field
DISPLACEMENT_STD, DET_JACOBIAN = "displacement_std.nii.gz", "det_jacobian.nii.gz"
METRICS_CSV, SUMMARY, CONFIG = "metrics.csv", "summary.json", "config.json"
KINDS = ("identity", "affine", "mean")  # the rows of metrics.csv: before, after the affine step, after both


@dataclass
class Registration:
    """What ``register`` returns. Images are SimpleITK images on the fixed image's grid.

    ``warped``: the moving image through ``transform`` (linear, moving intensity units, 0 outside);
    ``warped_seg``: its segmentation (nearest neighbour), or None; ``affine``: the affine step, fixed -> moving
    points; ``warp`` / ``inverse_warp``: the non-rigid displacement field p -> p + w(p) and its inverse
    (exp(-v) of the posterior mean's velocity), vector images in LPS mm; ``displacement_std``: the uncertainty,
    the std of the non-rigid displacement over the samples of q_v (mm; None for a network, or fewer than 2
    samples); ``det_jacobian``: det of the Jacobian of p -> p + w(p); ``rows``: metrics.csv's rows; ``summary``:
    summary.json's content; ``config``: the registration's config.
    """

    warped: sitk.Image
    warped_seg: sitk.Image | None
    affine: sitk.AffineTransform
    warp: sitk.Image
    inverse_warp: sitk.Image
    displacement_std: sitk.Image | None
    det_jacobian: sitk.Image
    rows: list[dict]
    summary: dict
    config: RunConfig

    @property
    def transform(self) -> sitk.CompositeTransform:
        """The whole transformation, fixed -> moving points: the warp first, then the affine transform."""
        return composite(self.affine, self.warp)

    @property
    def inverse_transform(self) -> sitk.CompositeTransform:
        """Its inverse, moving -> fixed points: the inverse affine transform first, then the inverse warp."""
        return sitk.CompositeTransform([displacement_transform(self.inverse_warp), self.affine.GetInverse()])

    def save(self, prefix: str | Path) -> dict[str, Path]:
        """Write every output as ``<prefix><name>`` (``prefix`` "out/" for a folder, "out/pair_" in ANTs' manner);
        returns name -> path."""
        prefix = str(prefix)
        paths = {}

        def target(name: str) -> Path:
            paths[name] = Path(prefix + name)
            return paths[name]

        write_sitk(target(WARPED_IM), self.warped)
        if self.warped_seg is not None:
            write_sitk(target(WARPED_SEG), self.warped_seg)
        write_affine(target(AFFINE), self.affine)
        write_sitk(target(WARP), self.warp)
        write_sitk(target(INVERSE_WARP), self.inverse_warp)
        whole = sitk.TransformToDisplacementField(self.transform, sitk.sitkVectorFloat64, self.warp.GetSize(),
                                                  self.warp.GetOrigin(), self.warp.GetSpacing(),
                                                  self.warp.GetDirection())
        write_sitk(target(DISPLACEMENT_ITK), sitk.Cast(whole, sitk.sitkVectorFloat32))
        if self.displacement_std is not None:
            write_sitk(target(DISPLACEMENT_STD), self.displacement_std)
        write_sitk(target(DET_JACOBIAN), self.det_jacobian)
        with atomic_write(target(METRICS_CSV)) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS))
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write_text(target(SUMMARY), json.dumps(self.summary, indent=2, allow_nan=False) + "\n")
        atomic_write_text(target(CONFIG), json.dumps(self.config.to_dict(), indent=2) + "\n")
        return paths


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """The transform of a displacement field, leaving ``field`` intact (the transform takes a copy)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def composite(affine: sitk.Transform, warp: sitk.Image) -> sitk.CompositeTransform:
    """T(p) = A(p + w(p)): SimpleITK applies a composite's last transform first, as antsApplyTransforms does with
    ``-t 1Warp.nii.gz -t 0GenericAffine.mat``."""
    return sitk.CompositeTransform([affine, displacement_transform(warp)])


def _initial_affine(initial_transform: str | Path | sitk.Transform | None) -> sitk.Transform | None:
    if initial_transform is None or isinstance(initial_transform, sitk.Transform):
        return initial_transform
    return read_affine(initial_transform)


def _labels(inputs: PairInputs, structures: dict[str, int] | str | Path | None) -> dict[str, int]:
    """Evaluation structures: ``structures`` (a dict or a labels JSON file), else every label of either
    segmentation, named ``label_<id>``."""
    if isinstance(structures, dict):
        return dict(structures)
    if structures is not None:
        return load_labels(structures)
    ids = set()
    for seg in (inputs.fixed_seg, inputs.moving_seg):
        ids |= set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist()) if seg is not None else set()
    return {f"label_{label}": int(label) for label in sorted(ids - {0})}


def _field_image(displacement: torch.Tensor, inputs: PairInputs, dims: Sequence[int]) -> sitk.Image:
    """Working-grid displacement (1, 3, *dims), voxels -> ITK displacement field on the fixed grid (LPS mm,
    float32 values, as written to disk)."""
    world = displacement_to_input_world(displacement[0].double().cpu().numpy(), inputs.affine, inputs.shape, dims)
    return sitk.Cast(itk_displacement_field(world, inputs.affine), sitk.sitkVectorFloat32)


def _input_voxels(field: sitk.Image, affine: np.ndarray) -> torch.Tensor:
    """An ITK displacement field (LPS mm) as a displacement (1, 3, X, Y, Z) in voxels of the grid of ``affine``."""
    lps = sitk.GetArrayFromImage(field).astype(np.float64).transpose(3, 2, 1, 0)  # (3, X, Y, Z)
    ras = lps * np.array([-1.0, -1.0, 1.0]).reshape(3, 1, 1, 1)
    voxels = np.einsum("kj,j...->k...", np.linalg.inv(np.asarray(affine)[:3, :3]), ras)
    return torch.from_numpy(voxels)[None]


def _metrics(inputs: PairInputs, warped_segs: dict[str, sitk.Image], displacement: torch.Tensor,
             labels: dict[str, int]) -> list[dict]:
    """metrics.csv's rows on the fixed grid: per kind (identity, affine, mean) and structure."""
    fixed_seg = array_from_image(inputs.fixed_seg) if inputs.fixed_seg is not None else None
    mask = array_from_image(inputs.fixed_mask) > 0 if inputs.fixed_mask is not None else None
    spacing = voxel_spacing(inputs.affine)
    identity = {"pair_id": "fixed_moving", "fixed_id": "fixed", "moving_id": "moving"}
    rows = []
    for kind in KINDS:
        warped = array_from_image(warped_segs[kind]) if kind in warped_segs else None
        moved = displacement[0] if kind == "mean" else torch.zeros_like(displacement[0])
        rows += metric_rows(identity, kind, fixed_seg, warped, moved, labels, spacing,
                            torch.from_numpy(mask) if mask is not None else None)
    return rows


def _mean(rows: list[dict], kind: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["sample"] == kind and isinstance(r[key], float) and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def _summary(rows: list[dict], labels: dict[str, int], extra: dict) -> dict:
    """summary.json: mean Dice, ASD and HD95 before registration, after the affine step and after both, per
    structure too, and the transformation's regularity."""
    summary = {"structures": labels,
               **{f"mean_{key}_{name}": _mean(rows, kind, key) for key in ("dice", "asd_mm", "hd95_mm")
                  for name, kind in (("before", "identity"), ("affine", "affine"), ("after", "mean"))},
               "per_structure": {structure: {kind: {key: next((r[key] for r in rows if r["sample"] == kind
                                                                and r["structure"] == structure), None)
                                                    for key in ("dice", "asd_mm", "hd95_mm")} for kind in KINDS}
                                 for structure in labels}}
    mean_row = next((r for r in rows if r["sample"] == "mean"), {})
    summary["transformation"] = {key: mean_row.get(key) for key in ("folding_voxels_mask", "folding_percent_mask",
                                                                    "log_jacobian_std")}
    summary.update(extra)
    return _json_ready(summary)


def _json_ready(value):
    """NaN and infinities -> None (JSON null), numpy numbers -> Python's, recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return int(value) if isinstance(value, np.integer) else value


def register(fixed: ImageInput, moving: ImageInput, *, fixed_mask: ImageInput | None = None,
             fixed_seg: ImageInput | None = None, moving_seg: ImageInput | None = None, affine: str = "mattes",
             initial_transform: str | Path | sitk.Transform | None = None, checkpoint: str | Path | None = None,
             metric: str | None = None, model: str | None = None, schedule: str | None = None,
             dims: Sequence[int] | int | None = None, iterations: int | None = None, samples: int | None = None,
             structures: dict[str, int] | str | Path | None = None, device: str | torch.device | None = None,
             overrides: Sequence[str] = (), progress: bool = False) -> Registration:
    """Register ``moving`` to ``fixed``; images are files, SimpleITK images or (array (X, Y, Z), affine (4, 4) RAS).

    ``affine``: the affine step's metric, "mattes" (mutual information) or "correlation", or "none" to skip it;
    ``initial_transform``: an ITK/ANTs affine (.mat, .tfm, .txt, or a SimpleITK transform) that the affine step
    starts from, or that is used as it is with "none". ``checkpoint``: a learnt metric (train.py's checkpoint or
    ``pretrained:NAME``; default the baseline ``metric``, LCC) or a VoxelMorph network. ``model``: SVF or SVFFD.
    ``schedule``: "pyramid" (coarse-to-fine q_v, ``trainer.q_v_pyramid``) or "faithful" (the reference's single
    grid); default the pyramid on the CPU, faithful on CUDA (and for SVFFD). ``dims``: the working grid (default
    the fixed image's largest size, at most 128). ``iterations``: q_v iterations (the most per level with the
    pyramid); ``samples``: samples of q_v for the uncertainty (default 5). ``structures``: the labels to evaluate
    (default every label of the segmentations). ``overrides``: ``KEY.PATH=VALUE`` config overrides.
    """
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if affine != "none" and affine not in AFFINE_METRICS:
        raise ValueError(f"affine must be one of {AFFINE_METRICS} or 'none', got {affine!r}")
    inputs = PairInputs.load(fixed, moving, fixed_mask, fixed_seg, moving_seg)
    initial = _initial_affine(initial_transform)
    if affine == "none" and initial is None:
        inputs.check_overlap(describe(fixed), describe(moving))
    labels = _labels(inputs, structures)

    path = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    network, loaded = None, None
    here = Path.cwd()
    if path is not None and holds_voxelmorph(path):
        given = [name for name, value in (("metric", metric), ("model", model), ("schedule", schedule),
                                          ("iterations", iterations), ("samples", samples)) if value is not None]
        if given:
            raise ConfigError(f"{checkpoint} is a VoxelMorph network: {', '.join(given)} "
                              f"{'applies' if len(given) == 1 else 'apply'} to q_v registration only; leave "
                              f"{'it' if len(given) == 1 else 'them'} out")
        network = load_voxelmorph(path, device)[0]
        config = vxm_registration_config(network.inshape, here, str(checkpoint), dims=dims, overrides=overrides)
        check_input_shape(network, config, str(checkpoint))  # an override of data_loader.args.dims
    else:
        loaded = load_checkpoint(path, device) if path is not None else None
        if loaded is not None:
            loaded["source"] = str(checkpoint)
        data = base_config(loaded, metric, model, str(checkpoint))
        chosen = schedule or ("pyramid" if device.type == "cpu" and (model or (
            "SVFFD" if data["transformation_module"]["type"] == "SVFFD_3D" else DEFAULT_MODEL)) == "SVF"
            else "faithful")
        config = registration_config(data, inputs.shape, here, model=model, dims=dims, iterations=iterations,
                                     samples=samples, schedule=chosen, overrides=overrides)
    working_dims = list(config.data_loader.args.dims)

    affine_start = time.perf_counter()
    transform = (affine_register(inputs.fixed, inputs.moving, affine, inputs.fixed_mask, initial)
                 if affine != "none" else initial or identity_affine())
    affine_seconds = time.perf_counter() - affine_start
    fixed_t, moving_t, mask_t = inputs.working(transform, working_dims, device)

    nonrigid_start = time.perf_counter()
    torch.manual_seed(config.seed)
    pair_ids = [f"{describe(moving)} to {describe(fixed)}"]
    extra: dict = {}
    if network is not None:
        with torch.no_grad():
            output = network(moving_t, fixed_t)
            mean, inverse = output.displacement, network.integrate(-output.velocity)
        samples_iter = []
    else:
        mean, inverse, samples_iter, extra = _q_v(config, loaded, fixed_t, moving_t, mask_t, progress, pair_ids)
    check_pairs_finite({"the transformation": mean, "its inverse": inverse}, "registration", pair_ids)
    nonrigid_seconds = time.perf_counter() - nonrigid_start

    warp, inverse_warp = _field_image(mean, inputs, working_dims), _field_image(inverse, inputs, working_dims)
    whole = composite(transform, warp)
    warped = sitk.Resample(inputs.moving, inputs.fixed, whole, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_segs = {}
    if inputs.moving_seg is not None:
        for kind, kind_transform in (("identity", identity_affine()), ("affine", transform), ("mean", whole)):
            warped_segs[kind] = resample(inputs.moving_seg, inputs.fixed, kind_transform, labels=True)
    displacement = _input_voxels(warp, inputs.affine)
    det_j = jacobian_determinant(displacement)[0].numpy()
    rows = _metrics(inputs, warped_segs, displacement, labels) if inputs.fixed_seg is not None and \
        inputs.moving_seg is not None else []
    std = _uncertainty(samples_iter, inputs, working_dims)
    extra.update(seconds={"affine": affine_seconds, "nonrigid": nonrigid_seconds,
                          "total": time.perf_counter() - start},
                 method=_method_name(config, loaded, network, checkpoint), working_grid=working_dims,
                 affine=affine if affine != "none" else ("initial transform" if initial is not None else "none"))
    if std is not None:
        mask = array_from_image(inputs.fixed_mask) > 0 if inputs.fixed_mask is not None else np.ones(inputs.shape, bool)
        extra["mean_displacement_std_mm"] = float(array_from_image(std)[mask].mean())
    return Registration(warped, warped_segs.get("mean"), transform, warp, inverse_warp, std,
                        image_like(det_j.astype(np.float32), inputs.fixed), rows, _summary(rows, labels, extra),
                        config)


def _method_name(config: RunConfig, checkpoint: dict | None, network: VxmDense | None, source) -> str:
    if network is not None:
        return f"VoxelMorph network {source}"
    metric = f"{'learnt' if checkpoint is not None else 'baseline'} {config.data_loss.type}"
    pyramid = config.trainer.q_v_pyramid
    schedule = f"pyramid {pyramid.levels}" if pyramid is not None else "faithful schedule"
    return f"{metric}, {config.transformation_module.type}, {schedule}"


def _q_v(config: QVTestConfig, checkpoint: dict | None, fixed: torch.Tensor, moving: torch.Tensor,
         mask: torch.Tensor, progress: bool, pair_ids: Sequence[str]):
    """q_v inference on the working grid: (posterior-mean displacement, its inverse, sampled displacements, extra
    summary entries), displacements (1, 3, *dims) in voxels; ``pair_ids`` names the pair in errors."""
    if checkpoint is not None and is_pretrained_model(checkpoint):  # it brings its own metric
        similarity = similarity_from_checkpoint(checkpoint, checkpoint["source"], config.trainer.channels_last)
    else:
        similarity = build_similarity(config, learnable=checkpoint is not None)
        if checkpoint is not None:
            load_similarity(similarity, checkpoint, checkpoint["source"])
    energy = build_energy(config, similarity).to(fixed.device)
    extra = {}
    if config.trainer.q_v_pyramid is not None:
        q_v, _, levels = infer_q_v_pyramid(energy, fixed, moving, mask, config, progress=progress,
                                           pair_ids=pair_ids)
        extra["q_v_levels"] = levels
    else:
        q_v, _ = infer_q_v(energy, fixed, moving, mask, config, progress=progress, pair_ids=pair_ids)
        extra["q_v_levels"] = [{"shape": list(fixed.shape[2:]), "iterations": config.trainer.no_iters_q_v}]
    with torch.no_grad():
        mean, inverse = energy.displacement(q_v.mu), energy.displacement(-q_v.mu)  # exp(S(mu)), exp(-S(mu))
    samples = list(sample_displacements(energy, q_v, config.trainer.no_samples_test)) \
        if config.trainer.no_samples_test >= 2 else []
    return mean, inverse, samples, extra


def _uncertainty(samples: Sequence[torch.Tensor], inputs: PairInputs, dims: Sequence[int]) -> sitk.Image | None:
    """The std of sampled displacements (1, 3, *dims), working voxels: sqrt of the summed variances of the world
    components (the RMS distance of the samples to their mean, mm), on the fixed grid; None with under 2 samples."""
    if len(samples) < 2:
        return None
    world = working_affine(inputs.affine, inputs.shape, dims)[:3, :3]
    moments = RunningMoments()
    for displacement in samples:
        moments.update(torch.einsum("kj,bj...->bk...", torch.as_tensor(world, dtype=torch.float64),
                                    displacement.double()))
    std = moments.variance().sum(1).sqrt()[0].float().cpu().numpy()
    return image_like(resample_to_input(std, inputs.shape, dims, "linear").astype(np.float32), inputs.fixed)


def apply_transform(transform: Path, image: Path, reference: Path, output: Path, labels: bool = False) -> Path:
    """Resample ``image`` onto the grid of ``reference`` through the ITK displacement field ``transform``.

    Linear interpolation for images, nearest neighbour for label maps (``labels``); zero outside the image. The
    output has the reference's grid and the format of its extension; image intensities are kept as they are.
    """
    field_transform = read_displacement_transform(transform)
    shape, affine = read_image_header(reference)
    array, image_affine = read_image(image, "seg" if labels else "image")
    target = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    origin, spacing, direction = itk_from_affine(affine)
    target.SetOrigin(origin)
    target.SetSpacing(spacing)
    target.SetDirection(direction)
    resampled = resample(image_from_array(array, image_affine), target, field_transform, labels)
    return write_image(output, array_from_image(resampled), affine, np.int32 if labels else np.float32)
