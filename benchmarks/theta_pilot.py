"""The issue-20 pilot: a few theta steps of each theta loss on three of fold a's training pairs, and what they do to
theta, in the numbers of ``benchmarks.theta_analysis``.

    python -m benchmarks.theta_pilot [--variants JSON] [--dims 24] [--steps 40] [--out FILE]

``--variants``: {"name": [metric, theta_loss block or null for the paper's contrastive loss], ...}; by default the
paper's loss and the alignment ranking, for SSD and LCC. Per variant, with the paper-budget protocol's training config
(``configs/synthbrain/paper_budget``; its lrs make 40 theta steps one paper budget) on the first three pairs of
fold a's training pairs (sub-02..04; never a held-out pair): the baseline's q_v is fitted for 128 iterations from
the initial q_v (the trainer's first epoch), then theta takes ``--steps`` steps on that fixed posterior (no q_v
iterations between steps: a pilot, not the protocol) and is described at step 0, half-way and at the end. The
alignment preference is measured against a reference alignment that the segmentations drive: the baseline SSD
registering label images (the 15 evaluation structures at distinct intensities, w_reg 0.05, 256 iterations).
Segmentations evaluate; nothing trains on them. One thread, so that a rerun gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.paper_budget import PROTOCOL
from benchmarks.ssd_investigation import training_batch
from benchmarks.theta_analysis import describe, similarity_at
from model.variational import QF
from trainer.build import build_energy, build_labels, build_similarity, build_theta_loss
from trainer.evaluation import batch_registration_metrics, mean_displacement
from trainer.q_v_inference import infer_q_v
from utils.config import load_config
from utils.io import atomic_write_text

NO_PAIRS = 3
VARIANTS = {"SSD contrastive": ["SSD", None], "SSD alignment_ranking": ["SSD", {"type": "alignment_ranking"}],
            "LCC contrastive": ["LCC", None], "LCC alignment_ranking": ["LCC", {"type": "alignment_ranking"}]}
REFERENCE = {"w_reg": 0.05, "no_iters": 256}  # the label-driven reference alignment
FIRST_EPOCH_ITERS = 128  # the paper-budget training configs' no_iters_q_v


def config_of(metric: str, dims: int, theta_loss: dict | None):
    sets = [f"data_loader.args.im_pairs={(PROTOCOL / 'fold_a_train.csv').resolve()}",
            f"data_loader.args.dims=[{dims},{dims},{dims}]"]
    sets += [] if theta_loss is None else [f"theta_loss={json.dumps(theta_loss)}"]
    return load_config(PROTOCOL / metric / f"config_train_{metric}.json", sets)


def mean_dice(energy, q_v, batch: dict, labels: dict) -> float:
    """Dice of the posterior mean, averaged over the structures and the pairs of ``batch``."""
    rows = batch_registration_metrics(mean_displacement(energy, q_v), batch, labels)
    return float(np.mean([r["dice"] for r in rows]))


def reference_alignment(dims: int, batch: dict, labels: dict) -> tuple[torch.Tensor, float]:
    """Mean velocities (N, 3, *dims) of the baseline SSD registering the pairs' segmentations as images, each of the
    15 structures at its own intensity (k / 15), everything else 0; and their mean Dice."""
    lut = torch.zeros(int(max(labels.values())) + 1)
    for k, label in enumerate(sorted(labels.values())):
        lut[label] = (k + 1) / len(labels)

    def as_image(seg: torch.Tensor) -> torch.Tensor:
        return torch.where(seg.long() < len(lut), lut[seg.long().clamp(0, len(lut) - 1)], 0.0)

    config = config_of("SSD", dims, None)
    config.reg_loss.args.w_reg = REFERENCE["w_reg"]
    energy = build_energy(config, build_similarity(config, learnable=False))
    torch.manual_seed(0)
    q_v, _ = infer_q_v(energy, as_image(batch["fixed"]["seg"]), as_image(batch["moving"]["seg"]),
                       batch["fixed"]["mask"], config, no_iters=REFERENCE["no_iters"])
    return q_v.mu.detach(), mean_dice(energy, q_v, batch, labels)


def pilot(metric: str, theta_loss: dict | None, dims: int, steps: int, batch: dict, labels: dict,
          aligned: torch.Tensor) -> dict:
    """theta steps of one variant on the baseline's fixed posterior; theta_analysis numbers at 0, steps/2, steps."""
    config = config_of(metric, dims, theta_loss)
    fixed, moving, mask = batch["fixed"]["im"], batch["moving"]["im"], batch["fixed"]["mask"]
    baseline = build_energy(config, build_similarity(config, learnable=False))
    torch.manual_seed(0)
    q_v, _ = infer_q_v(baseline, fixed, moving, mask, config, no_iters=FIRST_EPOCH_ITERS)
    similarity = similarity_at(config, None)
    q_f = QF(config.data_loader.args.dims, config.q_f.args.sigma_init, config.q_f.args.u_init)
    loss, sample_warped = build_theta_loss(config, similarity, q_f, build_energy(config, similarity))
    optimizers = [torch.optim.Adam(similarity.parameters(), lr=config.optimizer_q_phi.args.lr),
                  torch.optim.Adam(q_f.parameters(), lr=config.optimizer_q_f.args.lr)]
    described, losses = [], []
    for step in range(steps + 1):
        if step in (0, steps // 2, steps):
            described.append({"step": step, **describe(similarity, config, batch, aligned)})
        if step == steps:
            return {"metric": metric, "theta_loss": config.theta_loss.type, "theta_loss_args": config.theta_loss.args,
                    "baseline_q_v_dice": mean_dice(baseline, q_v, batch, labels), "loss": losses,
                    "describe": described}
        torch.manual_seed(1000 + step)
        warped = sample_warped(q_v, moving)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        value = loss(fixed, warped, mask)
        value.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(value.item())


def table(results: dict) -> str:
    """Markdown: per variant and step, gain, sharpness, pull, smooth fraction and preference."""
    lines = ["| variant | theta step | gain | sharpness | pull | smooth fraction | preference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in results["variants"].items():
        for d in result["describe"]:
            lines.append(f"| {name} | {d['step']} | {d['feature_gain']:.2f} | {d['feature_sharpness']:.2f} | "
                         f"{d['data_gradient_norm']:.3g} | {d['data_gradient_smooth_fraction']:.3f} | "
                         f"{d['alignment_preference']:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=json.loads, default=VARIANTS)
    parser.add_argument("--dims", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/theta_pilot.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = config_of("SSD", args.dims, None)
    batch, labels = training_batch(config, NO_PAIRS), build_labels(config)
    aligned, reference_dice = reference_alignment(args.dims, batch, labels)
    results = {"pairs": batch["pair_id"], "dims": args.dims, "steps": args.steps,
               "reference_alignment": {**REFERENCE, "dice": reference_dice},
               "variants": {name: pilot(metric, theta_loss, args.dims, args.steps, batch, labels, aligned)
                            for name, (metric, theta_loss) in args.variants.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"reference alignment: Dice {reference_dice:.3f}\n{table(results)}")
    return results


if __name__ == "__main__":
    main()
