"""TensorBoard logging of training beyond the per-step losses: registration quality, images and histograms.

Kept off the hot loop: it runs once per batch after the q_v iterations (one transformation and a nearest warp,
only when the data have segmentations), images every ``trainer.log_period`` steps, histograms once per epoch.
Every rank evaluates its own pairs; the per-epoch means are reduced over ranks and rank 0 writes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from data_loader.geometry import displacement_to_world
from model.energy import Energy
from model.variational import QF, QV
from trainer.evaluation import batch_registration_metrics, mean_displacement
from utils.config import RunConfig
from utils.distributed import Context, all_reduce_mean
from utils.figures import slice_montage
from utils.flow import warp

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

EPOCH_METRICS = ("dice", "asd_mm", "folding_percent_mask")


class TrainingMonitor:
    """Collects per-pair registration metrics of an epoch and writes images and histograms to ``writer`` (rank 0)."""

    def __init__(self, writer: SummaryWriter | None, config: RunConfig, context: Context, labels: Mapping[str, int]):
        self.writer, self.context, self.labels = writer, context, dict(labels)
        self.log_period, self.log_images = config.trainer.log_period, config.trainer.save_figures
        self.epoch_results: list[dict] = []

    @torch.no_grad()
    def record(self, batch: dict, displacement: torch.Tensor) -> None:
        """Registration metrics of a batch's transformation (B, 3, *dims), voxel units, for the epoch's means."""
        self.epoch_results += batch_registration_metrics(displacement, batch, self.labels)

    def images_due(self, step: int) -> bool:
        """Images at step 1 and every log_period steps, on rank 0, when figures are asked for."""
        return self.writer is not None and self.log_images and (step == 1 or step % self.log_period == 0)

    @torch.no_grad()
    def write_images(self, batch: dict, displacement: torch.Tensor, step: int, prefix: str,
                   extra: Mapping[str, torch.Tensor] | None = None) -> None:
        """Mid-slices (three orientations, each image min-max scaled) of the batch's first pair: fixed, moving,
        warped, ``<prefix>/displacement_mm`` (magnitude), and the ``extra`` volumes (D, H, W)."""
        displacement = displacement[:1]
        moving = batch["moving"]["im"][:1].to(displacement.device)
        warped = warp(moving, displacement)[0, 0]
        world = displacement_to_world(displacement[0].double().cpu().numpy(), batch["affine"][0].numpy())
        volumes = {"fixed": batch["fixed"]["im"][0, 0], "moving": moving[0, 0], "warped": warped,
                   f"{prefix}/displacement_mm": np.sqrt((world ** 2).sum(0)), **(extra or {})}
        for name, volume in volumes.items():
            array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else volume
            self.writer.add_image(f"images/{name}", slice_montage(array), step)

    @torch.no_grad()
    def after_q_v(self, batch: dict, q_v: QV, energy: Energy, q_f: QF, step: int) -> None:
        """After a batch's q_v inference: evaluate its posterior mean; images at step 1 and every log_period steps."""
        displacement = mean_displacement(energy, q_v)
        self.record(batch, displacement)
        if self.images_due(step):
            self.write_images(batch, displacement, step, "q_v", {
                "q_v/sigma": q_v.sigma[0].pow(2).sum(0).sqrt(),
                "q_f/sigma": torch.exp(0.5 * q_f.log_var[0, 0]), "q_f/u": q_f.u[0, 0]})

    def end_epoch(self, epoch: int, step: int, similarity: nn.Module, q_f: QF) -> None:
        """Mean Dice, ASD and folding of the epoch over all ranks' pairs; theta and q_f histograms. All ranks call."""
        if not self.log_epoch_metrics(step):
            return
        for name, parameter in similarity.named_parameters():
            self.writer.add_histogram(f"theta/{name}", parameter.detach().cpu(), epoch)
        self.writer.add_histogram("q_f/sigma", torch.exp(0.5 * q_f.log_var.detach()).cpu(), epoch)
        self.writer.add_histogram("q_f/u", q_f.u.detach().cpu(), epoch)
        self.writer.flush()

    def log_epoch_metrics(self, step: int) -> bool:
        """Write the epoch's mean Dice, ASD and folding over all ranks' pairs; every rank calls. True on the rank
        that writes."""
        sums = []
        for key in EPOCH_METRICS:
            values = [r[key] for r in self.epoch_results if math.isfinite(r[key])]
            sums += [float(sum(values)), float(len(values))]
        totals = all_reduce_mean(torch.tensor(sums, dtype=torch.float64, device=self.context.device),
                                 self.context).tolist()  # means of sums and counts: their ratio is the mean
        self.epoch_results = []
        if self.writer is None:
            return False
        for k, key in enumerate(EPOCH_METRICS):
            if totals[2 * k + 1] > 0:
                self.writer.add_scalar(f"epoch/{key}", totals[2 * k] / totals[2 * k + 1], step)
        return True
