"""Checkpoints of a learnt similarity metric: plain dicts of state dicts, loaded with weights_only=True."""
from __future__ import annotations

import pickle
import re
import tarfile
from pathlib import Path

import torch

from model.similarity import SimilarityMetric
from utils.config import RESUMABLE_KEYS, Config, ConfigError, apply_overrides, changed_keys, load_config, parse_config
from utils.io import atomic_torch_save, first_line

CHECKPOINT_KIND = "learnsim/similarity-metric"
FORMAT_VERSION = 1
REQUIRED = {"epoch": int, "step": int, "similarity": dict, "model": dict, "q_f": dict}  # in every checkpoint
REQUIRED_TO_RESUME = {"optimizer_q_phi": dict, "optimizer_q_f": dict, "config": dict}  # in those of a training run


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another kind, or does not fit the configured model."""


def similarity_signature(similarity: SimilarityMetric) -> dict:
    """What a checkpoint must agree on with the model that loads it."""
    signature = {"type": similarity.kind, "learnable": similarity.learnable}
    if similarity.kind == "LCC":
        signature["lcc_form"] = similarity.lcc_form
    return signature


def save_checkpoint(path: Path, *, epoch: int, step: int, similarity: SimilarityMetric, q_f: torch.nn.Module,
                    optimizer_theta: torch.optim.Optimizer, optimizer_q_f: torch.optim.Optimizer,
                    config: dict) -> None:
    """Write a checkpoint atomically."""
    atomic_torch_save({
        "kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "epoch": epoch, "step": step,
        "similarity": similarity_signature(similarity), "similarity_config": similarity.config(),
        "model": similarity.state_dict(), "q_f": q_f.state_dict(), "optimizer_q_phi": optimizer_theta.state_dict(),
        "optimizer_q_f": optimizer_q_f.state_dict(), "config": config,
    }, path)


def is_pretrained_model(checkpoint: dict) -> bool:
    """Whether a checkpoint is a pretrained model (theta and q_f, no optimizer states or run config), not a run's."""
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint of this project; clear errors for anything else.

    The returned dict also holds ``source``, the path it was read from, for messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(path, error)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a learnsim checkpoint (a {type(checkpoint).__name__}, not a dict)")
    if checkpoint.get("kind") != CHECKPOINT_KIND:
        config = checkpoint.get("config")
        if "model_state" in checkpoint and isinstance(config, dict) and "inshape" in config:
            raise CheckpointError(f"{path}: this is a VoxelMorph checkpoint, not a learnt similarity metric")
        raise CheckpointError(f"{path}: not a learnsim similarity-metric checkpoint (kind "
                              f"{checkpoint.get('kind')!r}, keys {sorted(map(str, checkpoint))[:8]})")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {checkpoint.get('format_version')} is not supported "
                              f"(expected {FORMAT_VERSION})")
    _check_keys(checkpoint, REQUIRED, path)
    return {**checkpoint, "source": str(path)}


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


def resume_config(checkpoint: dict, config_file: str | None, overrides: list[str]) -> Config:
    """The config of a resumed run: the checkpoint's, or ``config_file``'s, with ``overrides`` applied.

    Either must agree with the checkpoint's config on every key but RESUMABLE_KEYS, and leave epochs to run.
    """
    source = checkpoint["source"]
    _check_keys(checkpoint, REQUIRED_TO_RESUME, source)
    stored = parse_config(checkpoint["config"], Path(source).parent, f"{source} (config)")
    if config_file:
        config = load_config(config_file, overrides)
    else:
        config = parse_config(apply_overrides(checkpoint["config"], overrides), Path(source).parent,
                              f"{source} (config)")
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
        return "it is a tarball: give pretrained:NAME (python -m utils.pretrained list), or the .pt file inside"
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return (f"refused: it pickles {refused[1]}, which weights_only=True does not load; an authors' learnt-metric "
                f"file imports with 'python -m trainer.authors_import FILE OUT.pt' (or use pretrained:SSD_learnt / "
                f"LCC_learnt)")
    if isinstance(error, pickle.UnpicklingError):
        return ("refused, it holds pickled Python objects besides tensors and plain containers (checkpoints are "
                "loaded with weights_only=True)")
    return first_line(error)


def load_similarity(similarity: SimilarityMetric, checkpoint: dict, source: str) -> None:
    """Load theta into ``similarity``; fail clearly if the checkpoint is of another metric or shape."""
    expected, found = similarity_signature(similarity), checkpoint["similarity"]
    if expected != found:
        raise CheckpointError(f"{source}: the checkpoint holds a {found} metric but the config asks for {expected}")
    state = checkpoint["model"]
    own = similarity.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
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
