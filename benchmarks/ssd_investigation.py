"""Why baseline SSD does not register SynthBrain: intensities, gradients and what q_v does, on training pairs only.

    python -m benchmarks.ssd_investigation [--pairs N] [--iters K] [--out benchmarks/results/ssd_investigation.json]

Uses the first N pairs of the CPU protocol's training split (``configs/synthbrain/cpu_protocol/pairs_train.csv``),
never the held-out pairs that the protocol reports, at the protocol's grid and q_v settings. Measures:

- intensities: mean intensity of each of the 15 structures in the atlas and in the moving image (after the
  loader's min-max rescaling), their mean absolute difference, and the spread of the atlas's structure means;
- three q_v inferences of K iterations from the initial q_v: baseline LCC at its reference w_reg (2.8), baseline
  SSD at its reference w_reg (1.8) and SSD without regulariser (w_reg 0, a diagnostic, not a setting); for each,
  Dice and ASD of the posterior mean and the RMS of the smoothed mean velocity (voxels);
- the SSD data term at the identity and at the LCC solution (does SSD prefer the better-aligned transformation?);
- gradient norms with respect to the mean velocity, at the identity and at the LCC solution: SSD data term,
  LCC data term and the regulariser at w_reg 1.8 (no noise, no sampling: the deterministic energy of mu).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.variational import QV
from trainer.build import build_dataset, build_energy, build_labels, build_similarity
from trainer.evaluation import batch_registration_metrics, mean_displacement
from trainer.q_v_inference import fit_q_v
from utils.config import load_config
from utils.distributed import Context
from utils.io import atomic_write_text
from utils.regulariser import reg_term

PROTOCOL = Path("configs/synthbrain/cpu_protocol")


def _energy(metric: str, pairs: Path, w_reg: float | None = None):
    overrides = [f"data_loader.args.im_pairs={pairs.resolve()}"]
    config = load_config(PROTOCOL / metric / f"config_test_baseline_{metric}.json", overrides)
    if w_reg is not None:
        config.reg_loss.args.w_reg = w_reg
    return config, build_energy(config, build_similarity(config))


def structure_intensities(batch: dict, labels: dict[str, int]) -> list[dict]:
    """Per pair: mean |atlas - moving| of the structures' mean intensities, the std of the atlas's structure
    means (how far apart the structures are), and the correlation of the two sets of means."""
    results = []
    for i in range(batch["fixed"]["im"].shape[0]):
        means = []
        for side in ("fixed", "moving"):
            image, seg = batch[side]["im"][i, 0], batch[side]["seg"][i, 0]
            means.append([float(image[seg == label].mean()) for label in labels.values()])
        f, m = np.array(means[0]), np.array(means[1])
        results.append({"pair": batch["pair_id"][i], "mean_abs_difference": float(np.abs(f - m).mean()),
                        "atlas_structure_std": float(f.std()), "correlation": float(np.corrcoef(f, m)[0, 1]),
                        **{f"mean_intensity_{side}": float(batch[side]["im"][i][batch[side]["mask"][i] > 0].mean())
                           for side in ("fixed", "moving")}})
    return results


def training_batch(config, n: int) -> dict:
    """The first ``n`` pairs of ``config``'s pairs as one batch (the loader's resizing and rescaling), on the CPU."""
    dataset = build_dataset(config, Context(0, 1, 0, torch.device("cpu")))
    items = [dataset[i] for i in range(n)]
    batch = {side: {k: torch.stack([it[side][k] for it in items]) for k in items[0][side]}
             for side in ("fixed", "moving")}
    batch.update(pair_id=[it["pair_id"] for it in items], affine=torch.stack([it["affine"] for it in items]))
    return batch


def grad_norms(energy, velocity: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor,
                w_reg: float) -> dict[str, float]:
    """L2 norms (over the whole volume, summed over the batch) of d(term)/d(mean velocity)."""
    v = velocity.clone().requires_grad_(True)
    smoothed = energy.smooth(v)
    warped = energy.warp_moving(moving, energy.transformation(smoothed), noisy=False)
    terms = {"data": energy.similarity(fixed, warped, mask).sum(), "reg": reg_term(smoothed, w_reg).sum()}
    norms = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, v, retain_graph=True, allow_unused=True)
        norms[name] = 0.0 if grad is None else float(grad.norm())
    return norms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="first N training pairs")
    parser.add_argument("--iters", type=int, default=64, help="q_v iterations of each inference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ssd_investigation.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pairs = PROTOCOL / "pairs_train.csv"
    config, _ = _energy("SSD", pairs)
    batch = training_batch(config, args.pairs)
    labels = build_labels(config)
    fixed, moving, mask = batch["fixed"]["im"], batch["moving"]["im"], batch["fixed"]["mask"]
    report: dict = {"pairs": batch["pair_id"], "iters": args.iters, "dims": config.data_loader.args.dims,
                    "q_v_lr": config.optimizer_q_v.args.lr, "intensities": structure_intensities(batch, labels)}
    shape = config.data_loader.args.dims
    identity = torch.zeros(args.pairs, 3, *shape)
    runs = {}
    for name, metric, w_reg in (("LCC w_reg 2.8", "LCC", None), ("SSD w_reg 1.8", "SSD", None),
                                ("SSD w_reg 0", "SSD", 0.0)):
        torch.manual_seed(0)
        run_config, energy = _energy(metric, pairs, w_reg)
        args_q_v = run_config.data_loader.args
        q_v = QV.initial(args.pairs, shape, args_q_v.sigma_v_init, args_q_v.u_v_init)
        terms = fit_q_v(energy, q_v, fixed, moving, mask, args.iters, run_config.optimizer_q_v.args.lr)
        with torch.no_grad():
            metrics = batch_registration_metrics(mean_displacement(energy, q_v), batch, labels)
            smoothed = energy.smooth(q_v.mu)
        runs[name] = {"mu": q_v.mu.detach(), "dice": float(np.mean([m["dice"] for m in metrics])),
                      "asd_mm": float(np.mean([m["asd_mm"] for m in metrics])),
                      "rms_velocity_voxels": float(smoothed.pow(2).mean().sqrt()),
                      "data_term": terms["data_term"].tolist(), "reg_term": terms["reg_term"].tolist()}
    with torch.no_grad():
        before = batch_registration_metrics(torch.zeros(args.pairs, 3, *shape), batch, labels)
    report["before"] = {"dice": float(np.mean([m["dice"] for m in before])),
                        "asd_mm": float(np.mean([m["asd_mm"] for m in before]))}
    lcc_solution = runs["LCC w_reg 2.8"]["mu"]
    ssd_config, ssd = _energy("SSD", pairs)
    _, lcc = _energy("LCC", pairs)
    with torch.no_grad():
        report["ssd_data_term"] = {
            where: float(ssd.similarity(fixed, ssd.warp_moving(moving, ssd.transformation(ssd.smooth(v)), False),
                                        mask).sum())
            for where, v in (("identity", identity), ("lcc_solution", lcc_solution),
                             ("ssd_solution", runs["SSD w_reg 1.8"]["mu"]))}
    w_reg = ssd_config.reg_loss.args.w_reg
    report["gradient_norms"] = {
        f"{metric} at {where}": grad_norms(energy, v, fixed, moving, mask, w_reg)
        for metric, energy in (("SSD", ssd), ("LCC", lcc))
        for where, v in (("identity", identity), ("lcc_solution", lcc_solution))}
    report["gradient_norms_w_reg"] = w_reg
    report["q_v_runs"] = {name: {k: v for k, v in run.items() if k != "mu"} for name, run in runs.items()}
    report["wall_seconds"] = time.perf_counter() - start
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "intensities"}, indent=1))
    return report


if __name__ == "__main__":
    main()
