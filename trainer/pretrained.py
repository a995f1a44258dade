"""Checkpoints named by path or as ``pretrained:NAME``, and a learnt metric loaded as a plug-in loss.

The authors' learnt metrics are imported into this project's format the first time they are used
(trainer.authors_import); the imported file is kept beside the download in the cache.
``python -m trainer.pretrained pack CHECKPOINT OUT.pt`` turns a training checkpoint into a pretrained model
(theta and q_f, no optimizer states) and prints what its manifest entry needs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model.similarity import SimilarityLoss
from trainer.authors_import import import_authors_metric
from trainer.checkpoint import CheckpointError, load_checkpoint, pretrained_checkpoint, similarity_from_checkpoint
from utils.io import atomic_torch_save
from utils.pretrained import MANIFEST, file_checksum, resolve_pretrained

IMPORTED_SUFFIX = ".learnsim.pt"


def resolve_checkpoint(spec: str | os.PathLike, manifest: str | os.PathLike = MANIFEST,
                       cache: str | os.PathLike | None = None) -> Path:
    """The checkpoint file of a path or of ``pretrained:NAME`` (downloaded, verified, unpacked, imported)."""
    path, model = resolve_pretrained(spec, manifest, cache)
    if model is None or model.kind != "authors-learnsim-metric":
        return path
    imported = path.with_name(path.name.removesuffix(".pt") + IMPORTED_SUFFIX)
    if not imported.is_file():
        import_authors_metric(path, imported)
    return imported


def is_pretrained(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names a model of the manifest rather than a file."""
    return spec is not None and str(spec).startswith("pretrained:")


def load_metric(spec: str | os.PathLike, map_location: str | torch.device = "cpu") -> SimilarityLoss:
    """The learnt (or baseline) metric of a learnsim checkpoint or ``pretrained:NAME``, as a frozen loss module.

    No config is needed: the checkpoint stores the metric's constructor arguments. ``loss(fixed, warped, mask)``.
    """
    path = resolve_checkpoint(spec)
    checkpoint = load_checkpoint(path, map_location)
    similarity = similarity_from_checkpoint(checkpoint, str(spec))
    return SimilarityLoss(similarity).to(map_location)


def pack(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write the pretrained model of training checkpoint ``source``: theta, q_f and the run's config for the record."""
    checkpoint = load_checkpoint(source)
    similarity = similarity_from_checkpoint(checkpoint, str(source))
    atomic_torch_save(pretrained_checkpoint(similarity, checkpoint["q_f"], epoch=checkpoint["epoch"],
                                            step=checkpoint["step"], extra={"run_config": checkpoint["config"]}),
                      destination)
    return Path(destination)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.pretrained", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="a training checkpoint as a pretrained model (no optimizer states)")
    packer.add_argument("checkpoint")
    packer.add_argument("destination")
    args = parser.parse_args(argv)
    try:
        path = pack(args.checkpoint, args.destination)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    sys.stdout.write(f"{path}: size {path.stat().st_size}, checksum sha256:{file_checksum(path, 'sha256')}\n")


if __name__ == "__main__":
    main()
