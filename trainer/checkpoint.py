"""Training checkpoints (a learnt similarity metric, or a VoxelMorph network): plain dicts of state dicts with a
``kind``, loaded with weights_only=True."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import torch

from model.similarity import SimilarityMetric
from model.voxelmorph import VxmDense, load_authors_voxelmorph
from utils.config import (RESUMABLE_KEYS, ConfigError, RunConfig, apply_overrides, changed_keys, load_config,
                          parse_config)
from utils.io import atomic_torch_save, first_line, torch_load_problem
from utils.state_dict import state_dict_mismatch

CHECKPOINT_KIND = "learnsim/similarity-metric"
VXM_CHECKPOINT_KIND = "learnsim/voxelmorph"
FORMAT_VERSION = 1
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")  # the authors ship each VoxelMorph network as a tarball
VXM_HINT = "a VoxelMorph network registers with a VoxelMorph test config (model.type VxmDense)"
# keys (and their types) in every checkpoint of a kind, and in those of a training run, which can be resumed
REQUIRED = {CHECKPOINT_KIND: {"epoch": int, "step": int, "similarity": dict, "model": dict, "q_f": dict},
            VXM_CHECKPOINT_KIND: {"epoch": int, "step": int, "voxelmorph": dict, "model_state": dict}}
REQUIRED_TO_RESUME = {CHECKPOINT_KIND: {"optimizer_q_phi": dict, "optimizer_q_f": dict, "config": dict},
                      VXM_CHECKPOINT_KIND: {"optimizer": dict, "config": dict}}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another kind, or does not fit the configured model."""


def similarity_signature(similarity: SimilarityMetric) -> dict:
    """What a checkpoint must agree on with the model that loads it."""
    signature = {"type": similarity.kind, "learnable": similarity.learnable}
    if similarity.kind == "LCC":
        signature["lcc_form"] = similarity.lcc_form
    return signature


def save_run_checkpoint(path: Path, kind: str, *, epoch: int, step: int, config: dict, state: dict) -> None:
    """Write a training checkpoint of any kind atomically: kind, format version, epoch, step, state dicts, config."""
    atomic_torch_save({"kind": kind, "format_version": FORMAT_VERSION, "epoch": epoch, "step": step, **state,
                       "config": config}, path)


def metric_state(similarity: SimilarityMetric, q_f: torch.nn.Module, optimizer_theta: torch.optim.Optimizer,
                 optimizer_q_f: torch.optim.Optimizer) -> dict:
    """What a learnt-metric checkpoint holds besides its bookkeeping."""
    return {"similarity": similarity_signature(similarity), "similarity_config": similarity.config(),
            "model": similarity.state_dict(),
            "q_f": q_f.state_dict(), "optimizer_q_phi": optimizer_theta.state_dict(),
            "optimizer_q_f": optimizer_q_f.state_dict()}


def save_checkpoint(path: Path, *, epoch: int, step: int, similarity: SimilarityMetric, q_f: torch.nn.Module,
                    optimizer_theta: torch.optim.Optimizer, optimizer_q_f: torch.optim.Optimizer,
                    config: dict) -> None:
    """Write a learnt-metric checkpoint atomically."""
    save_run_checkpoint(path, CHECKPOINT_KIND, epoch=epoch, step=step, config=config,
                        state=metric_state(similarity, q_f, optimizer_theta, optimizer_q_f))


def is_pretrained_model(checkpoint: dict) -> bool:
    """Whether a checkpoint is a pretrained model (weights, no optimizer states or run config), not a run's: a new
    run starts from its weights, while a run's checkpoint resumes in its folder."""
    return checkpoint.get("config") is None


def pretrained_checkpoint(similarity: SimilarityMetric, q_f_state: dict, *, epoch: int, step: int,
                          extra: dict | None = None) -> dict:
    """A checkpoint of a pretrained metric: theta and q_f without optimizer states or run config.

    test.py and ``load_metric`` use it like any checkpoint; train.py starts a new run from its weights.
    """
    return {"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "epoch": epoch, "step": step,
            "similarity": similarity_signature(similarity), "similarity_config": similarity.config(),
            "model": similarity.state_dict(), "q_f": q_f_state, "optimizer_q_phi": None, "optimizer_q_f": None,
            "config": None, **(extra or {})}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The dict in a checkpoint file, loaded with weights_only=True; clear errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(path, error)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a learnsim checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def is_voxelmorph(checkpoint: dict) -> bool:
    """Whether a checkpoint dict holds a VoxelMorph network: ours (its kind) or the authors' (config, model_state)."""
    config = checkpoint.get("config")
    return checkpoint.get("kind") == VXM_CHECKPOINT_KIND or (
        "model_state" in checkpoint and isinstance(config, dict) and "inshape" in config)


def holds_voxelmorph(path: str | Path) -> bool:
    """Whether a file holds a VoxelMorph network: a tarball (the authors' layout) or a checkpoint ``is_voxelmorph``."""
    path = Path(path)
    return (path.name.endswith(TARBALL_SUFFIXES) and path.is_file()) or is_voxelmorph(read_checkpoint(path))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a learnt-metric checkpoint of this project; clear errors for anything else.

    The returned dict also holds ``source``, the path it was read from, for messages.
    """
    checkpoint = read_checkpoint(path, map_location)
    if checkpoint.get("kind") != CHECKPOINT_KIND:
        if is_voxelmorph(checkpoint):
            raise CheckpointError(f"{path}: this is a VoxelMorph checkpoint, not a learnt similarity metric; "
                                  f"{VXM_HINT}")
        raise CheckpointError(f"{path}: not a learnsim similarity-metric checkpoint (kind "
                              f"{checkpoint.get('kind')!r}, keys {sorted(map(str, checkpoint))[:8]})")
    return _checked(checkpoint, path)


def _checked(checkpoint: dict, path: str | Path) -> dict:
    """A checkpoint of this project with its format version and the keys of its kind checked, and its ``source``."""
    check_format_version(checkpoint, path)
    _check_keys(checkpoint, REQUIRED[checkpoint["kind"]], path)
    return {**checkpoint, "source": str(path)}


def check_format_version(checkpoint: dict, path: str | Path) -> None:
    """Fail unless the checkpoint has the format version this code reads."""
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {checkpoint.get('format_version')} is not supported "
                              f"(expected {FORMAT_VERSION})")


def _check_keys(checkpoint: dict, required: dict[str, type], source: str | Path) -> None:
    """Fail unless ``checkpoint`` holds every key of ``required`` with a value of its type."""
    for key, kind in required.items():
        if key not in checkpoint:
            raise CheckpointError(f"{source}: checkpoint has no {key!r} (incomplete or damaged)")
        if not isinstance(checkpoint[key], kind) or (kind is int and isinstance(checkpoint[key], bool)):
            raise CheckpointError(f"{source}: checkpoint {key!r} is a {type(checkpoint[key]).__name__}, expected "
                                  f"{kind.__name__}")


def load_state(target: torch.nn.Module | torch.optim.Optimizer, checkpoint: dict, key: str) -> None:
    """``target.load_state_dict(checkpoint[key])``, failing with the checkpoint and key named."""
    try:
        target.load_state_dict(checkpoint[key])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{checkpoint['source']}: {key} does not fit the configured run "
                              f"({first_line(error)})") from None


def check_kind(checkpoint: dict, config: RunConfig) -> None:
    """Fail, naming both files, unless the checkpoint holds what the config trains (a metric or a VoxelMorph net)."""
    holds_vxm = checkpoint["kind"] == VXM_CHECKPOINT_KIND
    if holds_vxm != (config.method == "voxelmorph"):
        what = "a VoxelMorph network" if holds_vxm else "a learnt metric"
        raise CheckpointError(f"{checkpoint['source']}: the checkpoint holds {what}, but {config.source} is a "
                              f"{config.kind}")


def resume_config(checkpoint: dict, config_file: str | None, overrides: list[str]) -> RunConfig:
    """The config of a resumed run: the checkpoint's, or ``config_file``'s, with ``overrides`` applied.

    Either must agree with the checkpoint's config on every key but RESUMABLE_KEYS, and leave epochs to run.
    """
    source = checkpoint["source"]
    _check_keys(checkpoint, REQUIRED_TO_RESUME[checkpoint["kind"]], source)
    stored = parse_config(checkpoint["config"], Path(source).parent, f"{source} (config)", mode="train")
    if config_file:
        config = load_config(config_file, overrides, mode="train")
    else:
        config = parse_config(apply_overrides(checkpoint["config"], overrides), Path(source).parent,
                              f"{source} (config)", mode="train")
        config.from_checkpoint = True
    check_kind(checkpoint, config)
    changed = [key for key in changed_keys(stored.to_dict(), config.to_dict()) if key not in RESUMABLE_KEYS]
    if changed:
        raise ConfigError(f"{config_file or '--set'}: {', '.join(changed)} differ from the config of the run in "
                          f"{source}; a resumed run continues that run, so only {', '.join(RESUMABLE_KEYS)} may change")
    if checkpoint["epoch"] >= config.trainer.no_epochs:
        raise ConfigError(f"{source}: the run has finished all its {config.trainer.no_epochs} epochs, nothing to "
                          f"resume; to train longer, add --set trainer.no_epochs=N with N > {checkpoint['epoch']}")
    return config


def _unreadable(path: Path, error: Exception) -> str:
    """Why torch.load refused a file, in one line, with what to do for the files users mix up."""
    if tarfile.is_tarfile(path):
        return ("it is a tarball: give pretrained:NAME (python -m utils.pretrained list), or the .pt file inside; "
                f"{VXM_HINT}")
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return (f"refused: it pickles {refused[1]}, which weights_only=True does not load; an authors' learnt-metric "
                f"file imports with 'python -m trainer.authors_import FILE OUT.pt' (or use pretrained:SSD_learnt / "
                f"LCC_learnt)")
    return torch_load_problem(error)


def load_similarity(similarity: SimilarityMetric, checkpoint: dict, source: str) -> None:
    """Load theta into ``similarity``; fail clearly if the checkpoint is of another metric or shape."""
    expected, found = similarity_signature(similarity), checkpoint["similarity"]
    if expected != found:
        raise CheckpointError(f"{source}: the checkpoint holds a {found} metric but the config asks for {expected}")
    state = checkpoint["model"]
    missing, unexpected, wrong = state_dict_mismatch(similarity.state_dict(), state)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: model weights do not fit the configured metric (missing {missing}, "
                              f"unexpected {unexpected}, wrong shape {wrong}); check model.args.no_features")
    similarity.load_state_dict(state)


def similarity_from_checkpoint(checkpoint: dict, source: str, channels_last: bool = False) -> SimilarityMetric:
    """The metric a checkpoint describes (its stored constructor arguments), with its weights; no config needed."""
    config = checkpoint.get("similarity_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the checkpoint does not describe its metric (no 'similarity_config'; "
                              f"written by an older learnsim): rebuild the metric from the config that trained it")
    try:
        similarity = SimilarityMetric(**{**config, "channels_last": channels_last})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: bad similarity_config {config}: {error}") from None
    load_similarity(similarity, checkpoint, source)
    return similarity


def vxm_state(model: VxmDense, optimizer: torch.optim.Optimizer) -> dict:
    """What a VoxelMorph training checkpoint holds besides its bookkeeping: the network's constructor arguments
    (``voxelmorph``), its weights (``model_state``, as in the authors' files) and the optimiser's state."""
    return {"voxelmorph": model.config(), "model_state": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_voxelmorph(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VxmDense, dict | None]:
    """The VoxelMorph network of a file: our training checkpoint, the authors' ``.tar.gz`` or the ``.pt`` in it.

    Returns the network (on ``map_location``, eval mode) and our checkpoint dict (None for the authors' files).
    A learnt-metric checkpoint, or anything else, fails with a message naming the file.
    """
    path = Path(path)
    if path.name.endswith(TARBALL_SUFFIXES) and path.is_file():
        return load_authors_voxelmorph(path, map_location), None
    checkpoint = read_checkpoint(path, map_location)
    if checkpoint.get("kind") == VXM_CHECKPOINT_KIND:
        checkpoint = _checked(checkpoint, path)
        model = VxmDense.from_config(checkpoint["voxelmorph"], str(path))
    elif is_voxelmorph(checkpoint):
        model = VxmDense.from_config(checkpoint["config"], str(path))
    elif checkpoint.get("kind") == CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: this is a learnt similarity-metric checkpoint, not a VoxelMorph network")
    else:
        raise CheckpointError(f"{path}: not a VoxelMorph checkpoint (kind {checkpoint.get('kind')!r}, keys "
                              f"{sorted(map(str, checkpoint))[:8]})")
    model.load_weights(checkpoint["model_state"], str(path))
    return model.to(map_location).eval(), checkpoint if checkpoint.get("kind") == VXM_CHECKPOINT_KIND else None


def load_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint that train.py can resume: a learnt metric's or a VoxelMorph network's, of this project."""
    checkpoint = read_checkpoint(path, map_location)
    if checkpoint.get("kind") in (CHECKPOINT_KIND, VXM_CHECKPOINT_KIND):
        return _checked(checkpoint, path)
    if is_voxelmorph(checkpoint):
        raise CheckpointError(f"{path}: this is the authors' VoxelMorph network, which has no training state to "
                              f"resume; register with it (test.py -r) or train a new network (train.py -c)")
    raise CheckpointError(f"{path}: not a learnsim training checkpoint (kind {checkpoint.get('kind')!r}, keys "
                          f"{sorted(map(str, checkpoint))[:8]})")

