"""The config of one registration (register.py, ``trainer.registration.register``): the reference's test config
of a metric and a transformation model, or a learnt metric's own, set up for a single pair on a working grid."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

from utils.config import ConfigError, QVTestConfig, RunConfig, VxmTestConfig, apply_overrides, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRICS = ("SSD", "LCC")
MODELS = {"SVF": "SVF_3D", "SVFFD": "SVFFD_3D"}  # --model -> transformation_module.type
SCHEDULES = ("pyramid", "faithful")  # coarse-to-fine q_v (trainer.q_v_pyramid), or the reference's single grid
DEFAULT_METRIC, DEFAULT_MODEL = "LCC", "SVF"
VXM_BASE = CONFIGS / "VXM" / "SSD" / "config_test_baseline.json"  # VoxelMorph test configs differ only in name


def reference_config(metric: str, model: str) -> dict:
    """The reference's baseline test config of ``metric`` (SSD, LCC) and ``model`` (SVF, SVFFD), as a dict."""
    if metric not in METRICS or model not in MODELS:
        raise ConfigError(f"no reference config for metric {metric!r} and model {model!r} (metrics {METRICS}, "
                          f"models {tuple(MODELS)})")
    return json.loads((CONFIGS / model / metric / f"config_test_baseline_{metric}.json").read_text())


def base_config(checkpoint: dict | None, metric: str | None, model: str | None, source: str | None = None) -> dict:
    """The config the defaults come from: the checkpoint's (the setting its metric was learnt in), else the
    reference's baseline test config of ``metric`` and ``model``.

    A checkpoint without a run config (a pretrained metric) gets the reference's config of its metric, learnable.
    """
    if checkpoint is None:
        return reference_config(metric or DEFAULT_METRIC, model or DEFAULT_MODEL)
    learnt = checkpoint["similarity"]["type"]
    if metric is not None and metric != learnt:
        raise ConfigError(f"{source}: the checkpoint holds a learnt {learnt} metric, not {metric}")
    if isinstance(checkpoint.get("config"), dict):
        return checkpoint["config"]
    config = reference_config(learnt, model or DEFAULT_MODEL)
    similarity = checkpoint.get("similarity_config") or {}
    config["model"]["args"].update(learnable=True, **{key: similarity[key] for key in ("s", "no_features")
                                                      if key in similarity})
    return config


def default_dims(input_shape: Sequence[int], largest: int) -> list[int]:
    """Working grid of an input: the cube the reference pads it to, of side max(input_shape), at most ``largest``."""
    side = min(max(int(n) for n in input_shape), int(largest))
    return [side] * 3


def _cube(dims: Sequence[int] | int) -> list[int]:
    """dims as 3 sizes: one size means a cube."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) not in (1, 3):
        raise ConfigError(f"dims takes 1 or 3 sizes, got {len(dims)}")
    return [int(n) for n in (dims * 3 if len(dims) == 1 else dims)]


def _single_pair(data: dict, data_path: Path, dims: Sequence[int], overrides: Sequence[str], source: str
                 ) -> RunConfig:
    """Config dict ``data`` set up for one pair on the working grid ``dims``, overridden, validated."""
    data["name"] = "register"
    data["data_loader"]["args"].update(data_path=str(data_path), im_pairs="pairs.csv", dims=list(dims),
                                       batch_size=1, no_workers=0, labels=None, demo=None)
    data["trainer"]["save_dir"] = str(data_path)
    return parse_config(apply_overrides(data, list(overrides)), CONFIGS, source, mode="test")


def registration_config(base: dict, fixed_shape: Sequence[int], data_path: Path, *, model: str | None = None,
                        dims: Sequence[int] | int | None = None, iterations: int | None = None,
                        samples: int | None = None, schedule: str = "faithful", overrides: Sequence[str] = (),
                        source: str = "register.py") -> QVTestConfig:
    """The validated config of one q_v registration.

    ``base`` (a reference or checkpoint config dict) gets the register.py settings (``model``: the reference's
    transformation, w_reg, q_v lr and iterations of that model; ``schedule`` "pyramid": coarse-to-fine q_v with
    the default ``trainer.q_v_pyramid``, ``iterations`` then being the most per level), then ``overrides``
    (``KEY.PATH=VALUE``, as test.py's --set). ``dims`` defaults to ``default_dims`` capped at the base config's
    largest dims (128 for the reference); one size means a cube.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"{source}: schedule must be one of {SCHEDULES}, got {schedule!r}")
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
    trainer["q_v_pyramid"] = {} if schedule == "pyramid" else None
    dims = default_dims(fixed_shape, max(data["data_loader"]["args"]["dims"])) if dims is None else _cube(dims)
    return _single_pair(data, data_path, dims, overrides, source)


def vxm_registration_config(inshape: Sequence[int], data_path: Path, network: str, *,
                            dims: Sequence[int] | int | None = None, overrides: Sequence[str] = (),
                            source: str = "register.py") -> VxmTestConfig:
    """The validated config of one registration by the VoxelMorph network ``network`` (its path or name, for
    messages), whose input shape is ``inshape``: the working grid is that shape, and ``dims``, when given, must equal
    it (one size means a cube)."""
    inshape = [int(n) for n in inshape]
    if dims is not None and _cube(dims) != inshape:
        raise ConfigError(f"{network}: the VoxelMorph network takes inputs of shape {inshape}, not --dims "
                          f"{_cube(dims)}; leave --dims out (the images are resampled to the network's shape)")
    return _single_pair(json.loads(VXM_BASE.read_text()), data_path, inshape, overrides, source)
