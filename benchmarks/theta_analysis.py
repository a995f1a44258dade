"""What theta learnt, in numbers: how strongly the metric pulls, and how far f has moved from the identity.

For a learnt metric at some theta step (or the Dirac initialisation, step 0), on the first N training pairs of the
CPU protocol (never the held-out pairs):

- ``data_gradient_norm``: the L2 norm of d(data term)/d(mean velocity) at the identity transformation (whole volume,
  summed over the pairs, no noise): how hard the data term pulls against the regulariser, whose gradient is 0 there
  and ~198 at the LCC solution for w_reg 1.8 (benchmarks/results/ssd_investigation.json);
- ``feature_gain``: std of f(F) / std of F inside the atlas's mask;
- ``feature_sharpness``: (mean |grad f(F)| / std f(F)) / (mean |grad F| / std F) inside the mask, forward
  differences; 1 at the identity, below 1 when f blurs;
- ``window_centre_fraction`` (learnt LCC): the centre weight of the LCC window over the sum of its weights, 1/27 for
  the initial box of ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.ssd_investigation import grad_norms, training_batch
from model.similarity import SimilarityMetric
from trainer.build import build_energy, build_similarity
from trainer.checkpoint import load_checkpoint, load_similarity
from utils.config import load_config


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """|forward-difference gradient| (D-1, H-1, W-1) of a volume (D, H, W), in intensity per voxel."""
    dz, dy, dx = (image.diff(dim=d)[tuple(slice(0, n - 1) for n in image.shape)] for d in range(3))
    return (dz ** 2 + dy ** 2 + dx ** 2).sqrt()


def feature_statistics(image: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Gain and relative sharpness of ``features`` = f(image) against ``image``, all (D, H, W), inside ``mask``."""
    inner = mask[:-1, :-1, :-1] > 0

    def sharpness(volume: torch.Tensor) -> float:
        return float(gradient_magnitude(volume)[inner].mean() / volume[mask > 0].std())

    return {"feature_gain": float(features[mask > 0].std() / image[mask > 0].std()),
            "feature_sharpness": sharpness(features) / sharpness(image)}


def describe(similarity: SimilarityMetric, config, batch: dict) -> dict[str, float]:
    """The numbers of the module docstring for ``similarity`` on ``batch`` (a training batch of ``config``)."""
    fixed, moving, mask = batch["fixed"]["im"], batch["moving"]["im"], batch["fixed"]["mask"]
    energy = build_energy(config, similarity)
    identity = torch.zeros(fixed.shape[0], 3, *fixed.shape[2:])
    result = {"data_gradient_norm": grad_norms(energy, identity, fixed, moving, mask,
                                               config.reg_loss.args.w_reg)["data"]}
    with torch.no_grad():
        result.update(feature_statistics(fixed[0, 0], similarity.features(fixed[:1])[0, 0], mask[0, 0]))
        if similarity.window is not None:
            window = similarity.window.detach()
            centre = tuple(n // 2 for n in window.shape[2:])
            result["window_centre_fraction"] = float(window[0, 0][centre] / window.sum())
    return result


def analyse(config_path: Path, pairs: Path, checkpoints: list[Path | None], no_pairs: int = 2) -> list[dict]:
    """``describe`` for the Dirac initialisation (None) and each checkpoint of a CPU-protocol training run."""
    config = load_config(config_path, [f"data_loader.args.im_pairs={pairs.resolve()}"])
    batch = training_batch(config, no_pairs)
    results = []
    for path in checkpoints:
        torch.manual_seed(config.seed)  # the initialisation the trainer starts from
        similarity = build_similarity(config)
        if path is not None:
            load_similarity(similarity, load_checkpoint(path), str(path))
        results.append({"pairs": batch["pair_id"], **describe(similarity, config, batch)})
    return results
