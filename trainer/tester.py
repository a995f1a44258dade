"""Registration of every pair of a config, then evaluation of the result.

``BaseTester`` evaluates whatever transformation a method outputs; ``Tester`` gets it by q_v inference with a
fixed metric (baseline or learnt), ``trainer.vxm_tester.VxmTester`` by one VoxelMorph forward pass.
Per pair: metrics of the identity (before registration), of the method's transformation (``mean``: the posterior
mean for q_v) and, for q_v, of ``no_samples_test`` samples, with the uncertainty map (std of the displacement over
the samples) and how it relates to label error; and, when the config asks for them, images, fields and a figure
in ``<run folder>/pairs/<pair_id>/`` (docs/outputs.md). The run folder gets ``metrics.csv``, ``summary.json`` and
``summary.png``; the time per pair is logged.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_loader.dataset import PairDataset
from data_loader.geometry import displacement_to_world
from model.variational import QV
from trainer import outputs
from trainer.build import (batch_seed, build_dataset, build_energy, build_labels, build_loader, build_similarity,
                           to_device)
from trainer.checkpoint import is_pretrained_model, load_similarity, similarity_from_checkpoint
from trainer.evaluation import (ROW_FIELDS, RunningMoments, format_table, mean_displacement, metric_rows,
                                sample_displacements, summarise, voxel_spacing)
from trainer.finite import check_pairs_finite
from trainer.q_v_inference import infer_q_v
from trainer.run_folder import get_logger
from utils.compare import by_structure
from utils.config import QVTestConfig, RunConfig
from utils.distributed import Context
from utils.figures import comparison_boxplots, pair_panel
from utils.flow import warp
from utils.io import atomic_write, atomic_write_text
from utils.metrics import jacobian_determinant, uncertainty_error_stats

SUMMARY_FIGURE = "summary.png"


def _sample_order(sample: str) -> int:
    """Rows sort identity, mean, then samples 0, 1, ..."""
    if sample in ("identity", "mean"):
        return -2 if sample == "identity" else -1
    return int(sample)


def _json_ready(value: Any) -> Any:
    """NaN and infinities -> None (JSON null), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def kept_items(index: int, batch_size: int, loader_batch_size: int, context: Context, dataset_size: int) -> list[bool]:
    """False for the items of batch ``index`` that DistributedSampler (no shuffling) repeats to even out the ranks.

    The sampler pads range(dataset_size) with its first indices and gives rank r the positions r, r + W, ...;
    positions from dataset_size on are the repeats.
    """
    start = index * loader_batch_size
    return [context.rank + context.world_size * (start + i) < dataset_size for i in range(batch_size)]


class BaseTester:
    """Registers every pair of the config's pairs file and writes the results into ``folder``.

    A subclass implements ``register_batch``; ``no_samples`` is the number of sampled transformations per pair.
    Building a tester checks the data and the checkpoint and writes nothing; ``test`` writes. ``dataset`` and
    ``labels`` replace the config's data and evaluation structures (register.py's single pair).
    """

    no_samples = 0
    transformation_name = "transformation"  # what the ``mean`` rows hold, for titles and the log
    log_name = "test"  # the log file is <folder>/<log_name>.log

    def __init__(self, config: RunConfig, folder: Path, context: Context, dataset: PairDataset | None = None,
                 labels: dict[str, int] | None = None):
        self.config, self.folder, self.context = config, Path(folder), context
        self.dataset = dataset if dataset is not None else build_dataset(config, context)
        self.loader = build_loader(self.dataset, config, context, shuffle=False)
        self.labels = labels if labels is not None else build_labels(config)
        self.notes: list[tuple[int, str]] = []  # (logging level, message) found by building, logged by test()
        self.logger = None  # made by test(): building writes nothing

    def register_batch(self, batch: dict, index: int) -> tuple[torch.Tensor, Iterable[torch.Tensor] | None]:
        """The method's displacement (B, 3, *dims), voxel units, and an iterable of sampled ones (or None)."""
        raise NotImplementedError

    def pair_folder(self, pair_id: str) -> Path:
        """Where the files of a pair go."""
        return self.folder / outputs.PAIRS_FOLDER / pair_id

    @torch.no_grad()
    def evaluate_displacements(self, batch: dict, mean: torch.Tensor, samples: Iterable[torch.Tensor] | None,
                               keep: Sequence[bool] | None = None) -> tuple[list[dict], dict]:
        """Metric rows (identity, ``mean``, samples) and uncertainty statistics of a batch; writes its files.

        ``mean`` (B, 3, *dims), voxel units, on the run's device: the method's transformation (rows ``mean``).
        Pairs with ``keep[i]`` False (repeats that even out the ranks) are neither evaluated nor written.
        Returns (rows, {pair_id: uncertainty statistics}; empty without samples).
        """
        device, batch_size = self.context.device, len(batch["pair_id"])
        keep = list(keep) if keep is not None else [True] * batch_size
        fixed, moving = batch["fixed"], batch["moving"]
        has_seg = "seg" in fixed and "seg" in moving
        geometries = [outputs.PairGeometry.from_batch(batch, i) for i in range(batch_size)]
        spacings = [voxel_spacing(g.affine) for g in geometries]
        identities = [{"pair_id": batch["pair_id"][i], "fixed_id": batch["fixed_id"][i],
                       "moving_id": batch["moving_id"][i]} for i in range(batch_size)]
        masks = fixed["mask"][:, 0] > 0
        fixed_segs = fixed["seg"][:, 0] if has_seg else None
        moving_im = moving["im"].to(device)
        moving_seg = moving["seg"].to(device) if has_seg else None

        def rows_of(sample: str, warped_seg: torch.Tensor | None, displacement: torch.Tensor) -> list[dict]:
            rows = []
            for i in range(batch_size):
                if keep[i]:
                    rows += metric_rows(identities[i], sample, fixed_segs[i] if has_seg else None,
                                        warped_seg[i, 0] if warped_seg is not None else None, displacement[i],
                                        self.labels, spacings[i], masks[i])
            return rows

        def warp_both(displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            warped_im = warp(moving_im, displacement).cpu()
            warped_seg = warp(moving_seg, displacement, mode="nearest").cpu() if has_seg else None
            return warped_im, warped_seg

        rows = rows_of("identity", moving["seg"] if has_seg else None, torch.zeros(batch_size, 3, *geometries[0].dims))
        mean_im, mean_seg = warp_both(mean)
        rows += rows_of("mean", mean_seg, mean.cpu())

        writers = [outputs.PairWriter(self.pair_folder(identities[i]["pair_id"]), geometries[i])
                   if keep[i] and self.config.trainer.save_outputs else None for i in range(batch_size)]
        world = torch.stack([torch.as_tensor(g.affine[:3, :3]) for g in geometries]).to(device, mean.dtype)
        moments = RunningMoments()
        for k, displacement in enumerate(samples or ()):
            sample_im, sample_seg = warp_both(displacement)
            rows += rows_of(str(k), sample_seg, displacement.cpu())
            moments.update(torch.einsum("bkj,bj...->bk...", world, displacement))  # mm, world axes
            for i, writer in enumerate(writers):
                if writer is not None:
                    writer.scalar(f"{outputs.SAMPLES_FOLDER}/{outputs.sample_name('warped_im', k)}",
                                  sample_im[i, 0], "linear")
                    if has_seg:
                        writer.labels(f"{outputs.SAMPLES_FOLDER}/{outputs.sample_name('warped_seg', k)}",
                                      sample_seg[i, 0])
        # the uncertainty map: sqrt of the summed per-axis variances = RMS distance of the samples to their mean
        std = moments.variance().sum(1).sqrt().float().cpu() if moments.count > 1 else None
        det_j = jacobian_determinant(mean).cpu()
        mean = mean.cpu()

        uncertainty = {}
        for i in range(batch_size):
            if not keep[i]:
                continue
            pair_id = identities[i]["pair_id"]
            if std is not None:
                uncertainty[pair_id] = (
                    uncertainty_error_stats(std[i], fixed_segs[i], mean_seg[i, 0], list(self.labels.values()),
                                            masks[i]) if has_seg
                    else {"mean_uncertainty_mask": float(std[i][masks[i]].mean())})
            self._write_pair(writers[i], i, pair_id, batch, mean_im, mean_seg, mean, std, det_j, spacings[i],
                             geometries[i], has_seg)
        return rows, uncertainty

    def _write_pair(self, writer: outputs.PairWriter | None, i: int, pair_id: str, batch: dict,
                    mean_im: torch.Tensor, mean_seg: torch.Tensor | None, mean: torch.Tensor,
                    std: torch.Tensor | None, det_j: torch.Tensor, spacing: Sequence[float],
                    geometry: outputs.PairGeometry, has_seg: bool) -> None:
        """The NIfTI files and the figure of pair i of a batch (working-grid tensors, on the CPU)."""
        if writer is not None:
            writer.scalar(outputs.WARPED_IM, mean_im[i, 0], "linear")
            if has_seg:
                writer.labels(outputs.WARPED_SEG, mean_seg[i, 0])
            writer.displacement(outputs.DISPLACEMENT, mean[i])
            try:
                writer.itk_displacement(outputs.ITK_DISPLACEMENT, mean[i])
            except ValueError as error:  # a sheared input affine has no ITK grid
                self.logger.warning("%s: %s not written: %s", pair_id, outputs.ITK_DISPLACEMENT, error)
            if std is not None:
                writer.scalar(outputs.DISPLACEMENT_STD, std[i], "linear")
            writer.scalar(outputs.DET_JACOBIAN, det_j[i], "linear")
        if self.config.trainer.save_figures:
            pair_panel(self.pair_folder(pair_id) / outputs.PANEL,
                       batch["fixed"]["im"][i, 0].numpy(), batch["moving"]["im"][i, 0].numpy(),
                       mean_im[i, 0].numpy(), batch["fixed"]["seg"][i, 0].numpy() if has_seg else None,
                       mean_seg[i, 0].numpy() if has_seg else None,
                       displacement_to_world(mean[i].double().numpy(), geometry.affine),
                       std[i].numpy() if std is not None else None, det_j[i].numpy(), spacing,
                       list(self.labels.values()), title=f"{pair_id} (working grid, {self.transformation_name})")

    def test(self) -> list[dict]:
        """Register all pairs; rank 0 gathers, writes metrics.csv, summary.json and summary.png and prints a table."""
        self.logger = get_logger(self.folder, self.context, self.log_name)
        for level, message in self.notes:
            self.logger.log(level, message)
        rows, uncertainty, seconds, registered = [], {}, 0.0, 0
        bar = tqdm(self.loader, desc="pairs", disable=None if self.context.is_main else True)  # None: a terminal only
        for index, batch in enumerate(bar):
            start = time.perf_counter()
            mean, samples = self.register_batch(batch, index)
            check_pairs_finite({"the transformation": mean}, "registration", batch["pair_id"])
            synchronize(self.context.device)
            elapsed = time.perf_counter() - start
            seconds, registered = seconds + elapsed, registered + len(batch["pair_id"])
            self.logger.info("registered %s in %.3f s per pair", ", ".join(batch["pair_id"]),
                             elapsed / len(batch["pair_id"]))
            keep = kept_items(index, len(batch["pair_id"]), self.config.data_loader.args.batch_size, self.context,
                              len(self.dataset))
            batch_rows, batch_uncertainty = self.evaluate_displacements(batch, mean, samples, keep)
            rows += batch_rows
            uncertainty.update(batch_uncertainty)
        if registered:
            self.logger.info("time per pair (%s, rank %d): %.3f s", self.transformation_name, self.context.rank,
                             seconds / registered)
        if self.context.distributed:
            gathered = [None] * self.context.world_size
            dist.all_gather_object(gathered, (rows, uncertainty))
            rows = [row for part, _ in gathered for row in part]
            uncertainty = {pair: stats for _, part in gathered for pair, stats in part.items()}
        order = {name: k for k, name in enumerate(self.labels)}
        unique = {(r["pair_id"], r["sample"], r["structure"]): r for r in rows}
        rows = sorted(unique.values(), key=lambda r: (r["pair_id"], _sample_order(r["sample"]),
                                                      order.get(r["structure"], -1)))
        if self.context.is_main and rows:
            self._write(rows, uncertainty)
        return rows

    def _write(self, rows: list[dict], uncertainty: dict) -> dict:
        """metrics.csv, summary.json, summary.png, and the table on the console and in test.log."""
        with atomic_write(self.folder / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS))
                writer.writeheader()
                writer.writerows(rows)
        summary = _json_ready(summarise(rows, uncertainty, self.no_samples, self.labels))
        atomic_write_text(self.folder / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
        if self.config.trainer.save_figures and any(r["structure"] for r in rows):
            groups = {"before (identity)": by_structure(rows, "identity"),
                      f"after ({self.transformation_name})": by_structure(rows, "mean")}
            if self.no_samples:
                groups[f"samples of q_v ({self.no_samples})"] = by_structure(rows, "samples")
            comparison_boxplots(self.folder / SUMMARY_FIGURE, groups, metrics=("dice", "asd_mm", "hd95_mm"),
                                title=self.config.name)
        self.logger.info("results per structure, %d pairs:\n%s", summary["no_pairs"],
                         format_table(summary, self.transformation_name))
        dice = [summary[key] for key in ("mean_dice_before", "mean_dice_after", "mean_dice_samples")]
        self.logger.info("mean Dice over %d pairs and %d structures: before %s, after %s (%s), %s (samples)",
                         summary["no_pairs"], len(self.labels), *("n/a" if value is None else f"{value:.3f}"
                                                                   for value in dice[:2]),
                         self.transformation_name, "n/a" if dice[2] is None else f"{dice[2]:.3f}")
        return summary


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that a wall-clock time includes its work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tester(BaseTester):
    """Registration by q_v inference with a fixed metric: the baseline, or theta from ``checkpoint``."""

    transformation_name = "posterior mean"

    def __init__(self, config: QVTestConfig, folder: Path, context: Context, checkpoint: dict | None = None,
                 dataset: PairDataset | None = None, labels: dict[str, int] | None = None):
        super().__init__(config, folder, context, dataset, labels)
        if checkpoint is not None and is_pretrained_model(checkpoint):  # it brings its metric; a run's must fit
            self.similarity = similarity_from_checkpoint(checkpoint, checkpoint["source"],
                                                         config.trainer.channels_last)
            self.notes.append((logging.INFO, f"metric of the checkpoint: {self.similarity.config()}"))
        else:
            self.similarity = build_similarity(config, learnable=checkpoint is not None)
            if checkpoint is not None:
                load_similarity(self.similarity, checkpoint, checkpoint["source"])
        self.energy = build_energy(config, self.similarity).to(context.device)
        self.no_samples = config.trainer.no_samples_test
        if self.no_samples < 2:
            self.notes.append((logging.WARNING, f"no_samples_test = {self.no_samples}: the displacement std "
                                                f"(uncertainty) needs at least 2 samples and is left out"))

    def register(self, batch: dict, index: int) -> QV:
        """q_v of a batch of pairs, inferred from the initial q_v."""
        torch.manual_seed(batch_seed(self.config.seed, 0, index, self.context.rank))
        device = self.context.device
        fixed, moving = to_device(batch["fixed"], device), to_device(batch["moving"], device)
        q_v, _ = infer_q_v(self.energy, fixed["im"], moving["im"], fixed["mask"], self.config,
                           progress=self.context.is_main, pair_ids=batch["pair_id"])
        return q_v

    def register_batch(self, batch: dict, index: int) -> tuple[torch.Tensor, Iterable[torch.Tensor]]:
        q_v = self.register(batch, index)
        return mean_displacement(self.energy, q_v), sample_displacements(self.energy, q_v, self.no_samples)

    def evaluate(self, batch: dict, q_v: QV, keep: Sequence[bool] | None = None) -> tuple[list[dict], dict]:
        """Metric rows and uncertainty statistics of a batch registered by ``q_v``; writes its files."""
        return self.evaluate_displacements(batch, mean_displacement(self.energy, q_v),
                                           sample_displacements(self.energy, q_v, self.no_samples), keep)
