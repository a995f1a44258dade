"""Checkpoints named by path or as ``pretrained:NAME``, and a learnt metric loaded as a plug-in loss.

The authors' learnt metrics are imported into this project's format the first time they are used
(trainer.authors_import); the imported file is kept beside the download in the cache.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from model.similarity import SimilarityLoss
from trainer.authors_import import import_authors_metric
from trainer.checkpoint import load_checkpoint, similarity_from_checkpoint
from utils.pretrained import MANIFEST, resolve_pretrained

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
