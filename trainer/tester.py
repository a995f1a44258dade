"""Registration with a fixed metric (baseline or learnt): q_v inference per pair, then evaluation of the result."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_loader.dataset import DEFAULT_LABELS, load_labels
from model.variational import QV
from trainer.build import batch_seed, build_dataset, build_energy, build_loader, build_similarity, to_device
from trainer.checkpoint import load_similarity
from trainer.q_v_inference import fit_q_v
from trainer.run_folder import get_logger
from utils.config import Config
from utils.distributed import Context
from utils.flow import warp
from utils.io import atomic_write, atomic_write_text
from utils.metrics import dice


class Tester:
    """Registers every pair of the config's pairs file and writes the results into ``folder``."""

    def __init__(self, config: Config, folder: Path, context: Context, checkpoint: dict | None = None):
        self.config, self.folder, self.context = config, Path(folder), context
        self.logger = get_logger(self.folder, context, "test")
        self.dataset = build_dataset(config, context)
        self.loader = build_loader(self.dataset, config, context, shuffle=False)
        self.similarity = build_similarity(config)
        if checkpoint is not None:
            load_similarity(self.similarity, checkpoint, "checkpoint")
        self.energy = build_energy(config, self.similarity).to(context.device)
        labels = config.data_loader.args.labels
        self.labels = load_labels(labels) if labels else DEFAULT_LABELS

    def register(self, batch: dict, index: int) -> QV:
        """q_v of a batch of pairs, inferred from the initial q_v."""
        torch.manual_seed(batch_seed(self.config.seed, 0, index, self.context.rank))
        args = self.config.data_loader.args
        device = self.context.device
        fixed, moving = to_device(batch["fixed"], device), to_device(batch["moving"], device)
        q_v = QV.initial(len(batch["pair_id"]), self.energy.transformation.velocity_shape, args.sigma_v_init,
                         args.u_v_init, device)
        fit_q_v(self.energy, q_v, fixed["im"], moving["im"], fixed["mask"], self.config.trainer.no_iters_q_v,
                self.config.optimizer_q_v.args.lr, progress=self.context.is_main)
        return q_v

    @torch.no_grad()
    def mean_displacement(self, q_v: QV) -> torch.Tensor:
        """Displacement (B, 3, *dims), voxel units, of the posterior mean of the (smoothed) velocity."""
        return self.energy.transformation(self.energy.smooth(q_v.mu))

    def evaluate(self, batch: dict, q_v: QV) -> list[dict]:
        """Dice per structure before (identity) and after registration with the posterior mean."""
        if "seg" not in batch["fixed"]:
            return []
        displacement = self.mean_displacement(q_v).cpu()
        warped_seg = warp(batch["moving"]["seg"], displacement, mode="nearest")
        label_ids = list(self.labels.values())
        rows = []
        for i, pair_id in enumerate(batch["pair_id"]):
            fixed_seg = batch["fixed"]["seg"][i, 0]
            before = dice(fixed_seg, batch["moving"]["seg"][i, 0], label_ids)
            after = dice(fixed_seg, warped_seg[i, 0], label_ids)
            for name, b, a in zip(self.labels, before, after):
                rows.append({"pair_id": pair_id, "structure": name, "dice_before": float(b), "dice_after": float(a)})
        return rows

    def test(self) -> list[dict]:
        """Register all pairs; rank 0 gathers, writes ``metrics.csv`` and ``summary.json`` and logs a table."""
        rows = []
        for index, batch in enumerate(tqdm(self.loader, desc="pairs", disable=not self.context.is_main)):
            q_v = self.register(batch, index)
            rows += self.evaluate(batch, q_v)
        if self.context.distributed:
            gathered = [None] * self.context.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        unique = {(r["pair_id"], r["structure"]): r for r in rows}  # the sampler repeats pairs to even out ranks
        rows = sorted(unique.values(), key=lambda r: (r["pair_id"], r["structure"]))
        if self.context.is_main and rows:
            self._write(rows)
        return rows

    def _write(self, rows: list[dict]) -> None:
        with atomic_write(self.folder / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        summary = {}
        for key in ("dice_before", "dice_after"):
            values = np.array([r[key] for r in rows], dtype=float)
            summary[f"mean_{key}"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        atomic_write_text(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.logger.info("mean Dice over %d pairs and %d structures: before %.3f, after %.3f",
                         len({r["pair_id"] for r in rows}), len(self.labels),
                         summary["mean_dice_before"], summary["mean_dice_after"])
