"""What theta learnt, in numbers: how strongly the metric pulls, and how far f has moved from the identity.

For a learnt metric at some theta step (or the Dirac initialisation, step 0), on the first N training pairs of the
CPU protocol (never the held-out pairs):

- ``data_gradient_norm``: the L2 norm of d(data term)/d(mean velocity) at the identity transformation (the
  smoothing passes gradients straight through, so this is also the gradient with respect to the smoothed velocity) (whole volume,
  summed over the pairs, no noise): how hard the data term pulls against the regulariser, whose gradient is 0 there
  and ~198 at the LCC solution for w_reg 1.8 (benchmarks/results/ssd_investigation.json);
- ``data_gradient_smooth_fraction``: ||S g|| / ||g|| for g the gradient of the data term with respect to the
  smoothed velocity at the identity, S the Sobolev smoothing: how much of the data term's pull survives the
  smoothing (1 for a constant field, near 0 for a voxel-scale checkerboard);
- ``q_v_mean_rms`` and ``q_v_smoothed_mean_rms`` (with ``q_v_iters`` > 0): RMS (voxels) of the mean velocity of
  q_v and of its smoothed version, after that many q_v iterations from the initial q_v (seeded): how far q_v
  inference moves, and how much of that motion the transformation sees;
- ``feature_gain``: std of f(F) / std of F inside the atlas's mask;
- ``feature_sharpness``: (mean |grad f(F)| / std f(F)) / (mean |grad F| / std F) inside the mask, forward
  differences; 1 at the identity, below 1 when f blurs;
- ``first_layer_centre_tap`` and ``first_layer_off_centre_tap`` (learnt metrics): mean |w| of the centre taps and
  of the 26 off-centre taps of f's first 3x3x3 convolution; the Dirac initialisation puts the centre taps at 1 /
  (output channels) on average and the others at ~1e-7, and Adam moves each by at most about lr per theta step;
- ``window_centre_fraction`` (learnt LCC): the centre weight of the LCC window over the sum of its weights, 1/27 for
  the initial box of ones;
- ``alignment_preference`` (given an aligned velocity, e.g. the posterior means of the control run with theta
  frozen): (data term at the identity - data term at the aligned transformation) / |data term at the identity|,
  no noise, summed over the pairs. Positive when the metric scores the aligned pairs as better matched; unchanged
  by a gain of f for SSD.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.ssd_investigation import training_batch
from model.energy import Energy
from model.similarity import SimilarityMetric
from trainer.build import build_energy, build_similarity
from trainer.checkpoint import load_checkpoint, load_similarity
from trainer.q_v_inference import infer_q_v
from trainer.q_v_store import QVStore
from utils.config import load_config
from utils.io import atomic_write_text

Q_V_ITERS = 64  # q_v iterations of the motion check of a protocol run (benchmarks/ssd_investigation.py's count)


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


@torch.no_grad()
def data_term(energy: Energy, velocity: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
              mask: torch.Tensor) -> float:
    """The data term of the transformation of the smoothed ``velocity`` (N, 3, D, H, W), without noise, summed
    over the N pairs (images (N, 1, D, H, W))."""
    warped = energy.warp_moving(moving, energy.transformation(energy.smooth(velocity)), noisy=False)
    return float(energy.similarity(fixed, warped, mask).sum())


def smooth_fraction(energy: Energy, field: torch.Tensor) -> float:
    """||S field|| / ||field|| for a velocity-shaped ``field`` (N, 3, D, H, W) and S the energy's Sobolev
    smoothing."""
    with torch.no_grad():
        return float(energy.smooth(field).norm() / field.norm())


def data_gradient(energy: Energy, velocity: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """d(data term)/d(smoothed velocity) (N, 3, D, H, W) at the smoothed velocity ``velocity``, without noise."""
    v = velocity.clone().requires_grad_(True)
    warped = energy.warp_moving(moving, energy.transformation(v), noisy=False)
    (grad,) = torch.autograd.grad(energy.similarity(fixed, warped, mask).sum(), v)
    return grad


def q_v_motion(energy: Energy, config, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor,
               no_iters: int) -> dict[str, float]:
    """RMS (voxels) of q_v's mean velocity and of its smoothed version after ``no_iters`` q_v iterations from
    the initial q_v, seeded with the config's seed."""
    torch.manual_seed(config.seed)
    q_v, _ = infer_q_v(energy, fixed, moving, mask, config, no_iters=no_iters)
    with torch.no_grad():
        mean = q_v.mu.detach()
        return {"q_v_mean_rms": float(mean.pow(2).mean().sqrt()),
                "q_v_smoothed_mean_rms": float(energy.smooth(mean).pow(2).mean().sqrt())}


def only_checkpoint(folder: Path) -> Path:
    """The one checkpoint (``*.pt``) in ``folder`` (a CPU-protocol run's ``checkpoints/`` or ``halfway/``)."""
    found = list(folder.glob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one checkpoint (*.pt), found {len(found)}; is this a "
                                f"finished CPU-protocol run?")
    return found[0]


def similarity_at(config, checkpoint: Path | None) -> SimilarityMetric:
    """The learnt metric of ``config`` at ``checkpoint``, or (None) the Dirac initialisation the trainer starts
    from."""
    torch.manual_seed(config.seed)  # the initialisation the trainer starts from
    similarity = build_similarity(config)
    if checkpoint is not None:
        load_similarity(similarity, load_checkpoint(checkpoint), str(checkpoint))
    return similarity


def describe(similarity: SimilarityMetric, config, batch: dict,
             aligned: torch.Tensor | None = None, q_v_iters: int = 0) -> dict[str, float]:
    """The numbers of the module docstring for ``similarity`` on ``batch`` (a training batch of ``config``);
    ``aligned``: mean velocities (N, 3, D, H, W) of a good alignment of the batch's pairs."""
    fixed, moving, mask = batch["fixed"]["im"], batch["moving"]["im"], batch["fixed"]["mask"]
    energy = build_energy(config, similarity)
    identity = torch.zeros(fixed.shape[0], 3, *fixed.shape[2:])
    gradient = data_gradient(energy, identity, fixed, moving, mask)
    result = {"data_gradient_norm": float(gradient.norm()),
              "data_gradient_smooth_fraction": smooth_fraction(energy, gradient)}
    if q_v_iters > 0:
        result.update(q_v_motion(energy, config, fixed, moving, mask, q_v_iters))
    if aligned is not None:
        at_identity = data_term(energy, identity, fixed, moving, mask)
        at_aligned = data_term(energy, aligned, fixed, moving, mask)
        result["alignment_preference"] = (at_identity - at_aligned) / abs(at_identity)
    with torch.no_grad():
        result.update(feature_statistics(fixed[0, 0], similarity.features(fixed[:1])[0, 0], mask[0, 0]))
        convs = getattr(similarity.features, "convs", None)
        if convs is not None:
            weight = convs[0].weight.detach().abs()
            off_centre = torch.ones(weight.shape[2:], dtype=torch.bool)
            off_centre[1, 1, 1] = False
            result.update(first_layer_centre_tap=float(weight[:, :, 1, 1, 1].mean()),
                          first_layer_off_centre_tap=float(weight[:, :, off_centre].mean()))
        if similarity.window is not None:
            window = similarity.window.detach()
            centre = tuple(n // 2 for n in window.shape[2:])
            result["window_centre_fraction"] = float(window[0, 0][centre] / window.sum())
    return result


def analyse(config_path: Path, pairs: Path, checkpoints: list[Path | None], no_pairs: int = 2,
            aligned_run: Path | None = None, q_v_iters: int = 0) -> list[dict]:
    """``describe`` for the Dirac initialisation (None) and each checkpoint of a CPU-protocol training run;
    ``aligned_run``: a finished training run (the control run) whose last q_v means are the aligned velocities."""
    config = load_config(config_path, [f"data_loader.args.im_pairs={pairs.resolve()}"])
    batch = training_batch(config, no_pairs)
    aligned = None
    if aligned_run is not None:
        epoch = load_checkpoint(only_checkpoint(aligned_run / "checkpoints"))["epoch"]
        store = QVStore(aligned_run / "q_v")
        shape = tuple(batch["fixed"]["im"].shape[2:])
        aligned = torch.stack([store.load(pair, epoch + 1, shape)["mu"] for pair in batch["pair_id"]])
    return [{"pairs": batch["pair_id"], **describe(similarity_at(config, path), config, batch, aligned, q_v_iters)}
            for path in checkpoints]


def describe_run(run: Path, aligned_run: Path | None = None, q_v_iters: int = Q_V_ITERS) -> list[dict]:
    """``analyse`` of a CPU-protocol training run folder (its config, ``halfway/`` and last checkpoint) on its own
    training pairs: steps 0, N/2 and N."""
    kept, final = only_checkpoint(run / "halfway"), only_checkpoint(run / "checkpoints")
    config_path = run / "config.json"
    pairs = Path(load_config(config_path).data_loader.args.im_pairs)
    return analyse(config_path, pairs, [None, kept, final], aligned_run=aligned_run, q_v_iters=q_v_iters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Recompute the 'theta' entries of a finished CPU-protocol result "
                                                 "(cpu_protocol.json) from its recorded run folders, in place.")
    parser.add_argument("result", type=Path)
    path = parser.parse_args(argv).result
    report = json.loads(path.read_text())
    for result in report["results"]:
        result["theta"] = describe_run(Path(result["train_run"]), Path(result["train_frozen_run"]))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
