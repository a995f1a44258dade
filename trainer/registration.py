"""Register two image files (register.py): test.py's testers on a one-pair dataset, and saved transforms applied.

The registration is q_v inference (baseline or learnt metric, ``Tester``) or one forward pass of a VoxelMorph
network (``VxmTester``).

The inputs are checked before anything is written: readable 3D images, a mask and segmentations on the grid of
their image, and fixed and moving images that overlap in world space (they must be affinely pre-aligned). The
moving image is resampled onto the fixed image's grid in world space when their grids differ. The outputs are
those of one test.py pair, written into a hidden folder beside the output folder and renamed to it at the end,
so that a failed run leaves nothing behind.
"""
from __future__ import annotations

import copy
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from data_loader.dataset import DEFAULT_LABELS, PairDataset, SubjectFiles
from data_loader.images import MIN_OVERLAP, read_image, read_image_header, same_grid, world_overlap, write_image
from model.voxelmorph import VxmDense
from trainer.run_folder import write_config
from trainer.tester import Tester
from trainer.vxm_tester import VxmTester
from utils.config import ConfigError, QVTestConfig, RunConfig, VxmTestConfig, apply_overrides, parse_config
from utils.distributed import Context
from utils.itk import array_from_image, image_from_array, itk_from_affine, read_displacement_transform, resample

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRICS = ("SSD", "LCC")
MODELS = {"SVF": "SVF_3D", "SVFFD": "SVFFD_3D"}  # --model -> transformation_module.type
FIXED_ID, MOVING_ID = "fixed", "moving"
VXM_BASE = CONFIGS / "VXM" / "SSD" / "config_test_baseline.json"  # VoxelMorph test configs differ only in name


@dataclass(frozen=True)
class PairFiles:
    """The files of one registration: images, and the optional fixed mask and segmentations."""

    fixed: Path
    moving: Path
    fixed_mask: Path | None = None
    fixed_seg: Path | None = None
    moving_seg: Path | None = None


def reference_config(metric: str, model: str) -> dict:
    """The reference's baseline test config of ``metric`` (SSD, LCC) and ``model`` (SVF, SVFFD), as a dict."""
    if metric not in METRICS or model not in MODELS:
        raise ConfigError(f"no reference config for metric {metric!r} and model {model!r} (metrics {METRICS}, "
                          f"models {tuple(MODELS)})")
    return json.loads((CONFIGS / model / metric / f"config_test_baseline_{metric}.json").read_text())


def default_dims(input_shape: Sequence[int], largest: int) -> list[int]:
    """Working grid of an input: the cube the reference pads it to, of side max(input_shape), at most ``largest``."""
    side = min(max(int(n) for n in input_shape), int(largest))
    return [side] * 3


def _cube(dims: Sequence[int]) -> list[int]:
    """--dims as 3 sizes: one size means a cube."""
    return [int(n) for n in (list(dims) * 3 if len(dims) == 1 else dims)]


def _single_pair(data: dict, data_path: Path, dims: Sequence[int], overrides: Sequence[str], source: str
                 ) -> RunConfig:
    """Config dict ``data`` set up for register.py's one pair on the working grid ``dims``, overridden, validated."""
    data["name"] = "register"
    data["data_loader"]["args"].update(data_path=str(data_path), im_pairs="pairs.csv", dims=list(dims),
                                       batch_size=1, no_workers=0, labels=None, demo=None)
    data["trainer"]["save_dir"] = str(data_path)
    return parse_config(apply_overrides(data, list(overrides)), CONFIGS, source, mode="test")


def registration_config(base: dict, fixed_shape: Sequence[int], data_path: Path, *, model: str | None = None,
                        dims: Sequence[int] | None = None, iterations: int | None = None,
                        samples: int | None = None, overrides: Sequence[str] = (), source: str = "register.py"
                        ) -> QVTestConfig:
    """The validated config of one q_v registration.

    ``base`` (a reference or checkpoint config dict) gets the register.py settings (``model``: the reference's
    transformation, w_reg, q_v lr and iterations of that model), then ``overrides``
    (``KEY.PATH=VALUE``, as test.py's --set). ``dims`` defaults to ``default_dims`` capped at the base config's
    largest dims (128 for the reference); one size means a cube.
    """
    data = copy.deepcopy(base)
    if model is not None:  # the reference's registration setting of that model: w_reg, q_v lr and iterations differ
        reference = reference_config(data["data_loss"]["type"], model)
        for key in ("transformation_module", "reg_loss", "optimizer_q_v"):
            data[key] = reference[key]
        data["trainer"]["no_iters_q_v"] = reference["trainer"]["no_iters_q_v"]
    trainer = data["trainer"]
    if iterations is not None:
        trainer["no_iters_q_v"] = iterations
    if samples is not None:
        trainer["no_samples_test"] = samples
    dims = default_dims(fixed_shape, max(data["data_loader"]["args"]["dims"])) if dims is None else _cube(dims)
    return _single_pair(data, data_path, dims, overrides, source)


def vxm_registration_config(inshape: Sequence[int], data_path: Path, network: str, *,
                            dims: Sequence[int] | None = None, overrides: Sequence[str] = (),
                            source: str = "register.py") -> VxmTestConfig:
    """The validated config of one registration by the VoxelMorph network ``network`` (its path or name, for
    messages), whose input shape is ``inshape``: the working grid is that shape, and ``dims``, when given, must equal
    it (one size means a cube)."""
    inshape = [int(n) for n in inshape]
    if dims is not None and _cube(dims) != inshape:
        raise ConfigError(f"{network}: the VoxelMorph network takes inputs of shape {inshape}, not --dims "
                          f"{_cube(dims)}; leave --dims out (the images are resampled to the network's shape)")
    return _single_pair(json.loads(VXM_BASE.read_text()), data_path, inshape, overrides, source)


def check_inputs(files: PairFiles) -> tuple[SubjectFiles, SubjectFiles]:
    """The fixed and moving subjects of a registration, checked from the file headers.

    Every file must be a readable 3D image, a mask or segmentation must be on its image's grid, and the images
    must overlap in world space. The moving subject gets the fixed image's grid as its input grid.
    """
    fixed_shape, fixed_affine = read_image_header(files.fixed)
    try:
        itk_from_affine(fixed_affine)
    except ValueError as error:
        raise ValueError(f"{files.fixed}: {error}") from None
    moving_shape, moving_affine = read_image_header(files.moving)
    for path, what, image, shape, affine in (
            (files.fixed_mask, "mask", files.fixed, fixed_shape, fixed_affine),
            (files.fixed_seg, "segmentation", files.fixed, fixed_shape, fixed_affine),
            (files.moving_seg, "segmentation", files.moving, moving_shape, moving_affine)):
        if path is None:
            continue
        other_shape, other_affine = read_image_header(path)
        if not same_grid(shape, affine, other_shape, other_affine):
            raise ValueError(f"{path}: {what} grid (shape {other_shape}, affine {_short(other_affine)}) does not "
                             f"match its image {image} (shape {shape}, affine {_short(affine)})")
    overlap = world_overlap(fixed_shape, fixed_affine, moving_shape, moving_affine)
    if overlap < MIN_OVERLAP:
        raise ValueError(f"{files.moving} and {files.fixed} barely overlap in world space ({overlap:.0%} of the "
                         f"smaller field of view, at least {MIN_OVERLAP:.0%} needed): the images must be affinely "
                         f"pre-aligned")
    file_grid = (None if same_grid(fixed_shape, fixed_affine, moving_shape, moving_affine)
                 else (moving_shape, moving_affine))
    return (SubjectFiles(FIXED_ID, files.fixed, files.fixed_mask, files.fixed_seg, fixed_shape, fixed_affine),
            SubjectFiles(MOVING_ID, files.moving, None, files.moving_seg, fixed_shape, fixed_affine, file_grid))


def _short(affine: np.ndarray) -> str:
    """An affine on one line."""
    return np.array2string(np.asarray(affine)[:3], precision=3, separator=",").replace("\n", "")


def labels_found(dataset: PairDataset) -> dict[str, int]:
    """Evaluation structures when none are named: every label id of either segmentation, as ``label_<id>``."""
    segs = [dataset.load_subject(subject).get("seg") for subject in (FIXED_ID, MOVING_ID)]
    if any(seg is None for seg in segs):
        return dict(DEFAULT_LABELS)  # without both segmentations nothing is evaluated
    ids = sorted((set(np.unique(segs[0].numpy()).tolist()) | set(np.unique(segs[1].numpy()).tolist())) - {0})
    return {f"label_{label}": int(label) for label in ids}


class SinglePair:
    """A tester of one pair (mixed in before a tester class): its files go straight into the output folder, not
    into pairs/<pair_id>/, and its log is register.log."""

    log_name = "register"
    folder: Path

    def pair_folder(self, pair_id: str) -> Path:
        return self.folder


class PairTester(SinglePair, Tester):
    """q_v registration of one pair."""


class PairVxmTester(SinglePair, VxmTester):
    """VoxelMorph registration of one pair."""


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output {output} exists and is not an empty folder: choose another or remove it")


def register_files(files: PairFiles, output: Path, config: QVTestConfig | VxmTestConfig, context: Context,
                   checkpoint: dict | None = None, structures: dict[str, int] | None = None,
                   network: tuple[VxmDense, str] | None = None) -> dict:
    """Register ``files`` with ``config`` and write the results into ``output``; returns summary.json's content.

    A q_v config registers with the baseline metric or the learnt metric of ``checkpoint``; a VoxelMorph config with
    ``network`` (the network and where it came from, for messages).

    Every input is checked and loaded before anything is written; the results are written into a hidden folder
    beside ``output`` that becomes ``output`` only when everything succeeded, and is removed otherwise.
    """
    output = Path(output)
    _check_output(output)
    fixed, moving = check_inputs(files)
    dataset = PairDataset.from_subjects([fixed, moving], [(FIXED_ID, MOVING_ID)], config.data_loader.args.dims)
    for subject in (FIXED_ID, MOVING_ID):
        dataset.load_subject(subject)  # voxel-level problems (NaN, constant image, empty mask) fail here
    labels = structures if structures is not None else labels_found(dataset)

    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        write_config(staging, config.to_dict())
        if config.method == "voxelmorph":
            tester = PairVxmTester(config, staging, context, *network, dataset, labels)
        else:
            tester = PairTester(config, staging, context, checkpoint, dataset, labels)
        try:
            tester.test()
        finally:
            logger = getattr(tester, "logger", None)  # made by test()
            for handler in list(logger.handlers) if logger else ():
                handler.close()
                logger.removeHandler(handler)
        summary = json.loads((staging / "summary.json").read_text())
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def apply_transform(transform: Path, image: Path, reference: Path, output: Path, labels: bool = False) -> Path:
    """Resample ``image`` onto the grid of ``reference`` through the ITK displacement field ``transform``.

    Linear interpolation for images, nearest neighbour for label maps (``labels``); zero outside the image. The
    output has the reference's grid and the format of its extension; image intensities are kept as they are.
    """
    field = read_displacement_transform(transform)
    shape, affine = read_image_header(reference)
    array, image_affine = read_image(image, "seg" if labels else "image")
    target = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    origin, spacing, direction = itk_from_affine(affine)
    target.SetOrigin(origin)
    target.SetSpacing(spacing)
    target.SetDirection(direction)
    resampled = resample(image_from_array(array, image_affine), target, field, labels)
    return write_image(output, array_from_image(resampled), affine, np.int32 if labels else np.float32)
