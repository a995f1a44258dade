"""Import the authors' learnt metrics (SSD_learnt, LCC_learnt) into this project's checkpoint format.

Their files are pytorch-template checkpoints: a dict with ``config`` (a pickled ConfigParser object, read as an
inert stub), ``epoch``, ``step``, state dicts ``model`` and ``q_f``, and both optimizers. They are read with
utils.safe_pickle (nothing they name is run) and converted:

- ``model``: ``enc.enc.{i}.main.{weight,bias}`` -> ``features.convs.{i}.{weight,bias}``, ``agg.weight`` ->
  ``features.aggregation.weight``, and for LCC ``kernel.weight`` -> ``window`` (the learnt LCC window);
- ``q_f``: ``log_var`` and ``u`` (``mu`` is the atlas image, which this project does not store);
- every spatial tensor (the conv kernels, the LCC window, q_f's images) reoriented from the reference's voxel order to
  ours (``from_authors_layout``): its loader read images as SimpleITK arrays, indexed (k, j, i), and then reversed
  every axis (``torch.flipud`` of the flattened array), where this project indexes the file's voxels (i, j, k);
- the optimizer states are left out (the file is a pretrained model, not a run to resume);
- ``config``: the reference's JSON config, read from the stub, kept as ``authors_config`` for the record.

``python -m trainer.authors_import SOURCE.pt DESTINATION.pt``
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from model.similarity import SimilarityMetric
from trainer.checkpoint import CHECKPOINT_KIND, CheckpointError, pretrained_checkpoint
from utils.io import atomic_torch_save
from utils.safe_pickle import InertObject, find_inert, restricted_torch_load

def from_authors_layout(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor (..., a, b, c) in the reference's voxel order -> (..., i, j, k), this project's.

    The reference's tensor at (a, b, c) holds the file's voxel (I-1-c, J-1-b, K-1-a): its axes are ours in reverse
    order (SimpleITK's array order), each one reversed (its loader's flip). A convolution kernel maps the same way, so
    that a metric imported with its kernels reoriented computes on our tensors what the reference computed on its own.
    """
    return tensor.permute(*range(tensor.dim() - 3), -1, -2, -3).flip(-1, -2, -3).contiguous()


ENCODER_KEY = re.compile(r"enc\.enc\.(\d+)\.main\.(weight|bias)")
NEGATIVE_SLOPE = 0.2  # METHOD.md: LeakyReLU(0.2) in the reference's encoder, when its config does not say


def _authors_config(config: object) -> dict | None:
    """The reference's JSON config (``ConfigParser._config``) when it holds only plain values, else None."""
    state = config.state if isinstance(config, InertObject) else None
    raw = state.get("_config") if isinstance(state, dict) else None
    if not isinstance(raw, dict) or find_inert(raw):
        return None
    return _plain(raw)


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _negative_slope(config: dict | None) -> float:
    try:
        return float(config["model"]["args"]["activation"]["args"]["negative_slope"])
    except (KeyError, TypeError, ValueError):
        return NEGATIVE_SLOPE


def convert_authors_metric(raw: object, source: str) -> dict:
    """This project's checkpoint dict from the contents of an authors' learnt-metric file."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: not an authors' learnt-metric checkpoint (a {type(raw).__name__})")
    if raw.get("kind") == CHECKPOINT_KIND:
        raise CheckpointError(f"{source}: already a learnsim checkpoint; nothing to import")
    if "model_state" in raw:
        raise CheckpointError(f"{source}: a VoxelMorph checkpoint, not a learnt similarity metric")
    model, q_f = raw.get("model"), raw.get("q_f")
    if not isinstance(model, dict) or not isinstance(q_f, dict):
        raise CheckpointError(f"{source}: not an authors' learnt-metric checkpoint: no 'model' and 'q_f' state "
                              f"dicts (keys {sorted(map(str, raw))[:8]})")
    tensors = {**{f"model.{k}": v for k, v in model.items()}, **{f"q_f.{k}": v for k, v in q_f.items()}}
    not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: refused: {not_tensors[:4]} are not tensors")

    state, convs = {}, {}
    for key, value in model.items():
        match = ENCODER_KEY.fullmatch(key)
        if match:
            convs.setdefault(int(match[1]), {})[match[2]] = value
            state[f"features.convs.{match[1]}.{match[2]}"] = from_authors_layout(value) if value.dim() == 5 else value
        elif key == "agg.weight":
            state["features.aggregation.weight"] = value
        elif key == "kernel.weight":
            state["window"] = from_authors_layout(value)
        else:
            raise CheckpointError(f"{source}: unexpected key {key!r} in the model state dict")
    if sorted(convs) != list(range(len(convs))) or "features.aggregation.weight" not in state or \
            any(set(c) != {"weight", "bias"} for c in convs.values()):
        raise CheckpointError(f"{source}: the model state dict is not a learnt metric (encoder layers "
                              f"{sorted(convs)}, keys {sorted(model)[:8]})")
    kind = "LCC" if "window" in state else "SSD"
    s = (state["window"].shape[-1] - 1) // 2 if kind == "LCC" else 1
    authors_config = _authors_config(raw.get("config"))
    similarity = SimilarityMetric(kind, True, s=s, no_features=[convs[i]["weight"].shape[0] for i in sorted(convs)],
                                  negative_slope=_negative_slope(authors_config))
    own = similarity.state_dict()
    wrong = sorted(k for k in own if k not in state or own[k].shape != state[k].shape)
    if wrong:
        raise CheckpointError(f"{source}: the weights do not fit a learnt {kind} metric ({wrong[:4]})")
    similarity.load_state_dict(state)
    if not {"log_var", "u"} <= set(q_f) or q_f["log_var"].shape != q_f["u"].shape:
        raise CheckpointError(f"{source}: q_f needs 'log_var' and 'u' of one shape, got {sorted(q_f)}")
    shape = q_f["u"].shape[-3:]
    return pretrained_checkpoint(
        similarity, {k: from_authors_layout(q_f[k].reshape(1, 1, *shape).float()) for k in ("log_var", "u")},
        epoch=raw["epoch"] if isinstance(raw.get("epoch"), int) else 0,
        step=raw["step"] if isinstance(raw.get("step"), int) else 0,
        extra={"authors_config": authors_config, "imported_from": Path(source).name})


def import_authors_metric(source: str | Path, destination: str | Path) -> Path:
    """Convert the authors' file ``source`` into a learnsim checkpoint at ``destination`` (written atomically)."""
    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise CheckpointError(f"authors' checkpoint {source} does not exist")
    try:
        raw = restricted_torch_load(source)
    except Exception as error:
        raise CheckpointError(f"cannot read {source} as an authors' checkpoint: {error}") from None
    atomic_torch_save(convert_authors_metric(raw, str(source)), destination)
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.authors_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the authors' checkpoint (.pt, unpacked from SSD_learnt / LCC_learnt.tar.gz)")
    parser.add_argument("destination", help="the learnsim checkpoint to write")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(f"{import_authors_metric(args.source, args.destination)}\n")
    except CheckpointError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
