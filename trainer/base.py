"""What every training run shares: the pair loader, the epoch loop with tqdm and TensorBoard scalars, the
registration monitor, seeded batches, an atomic checkpoint per epoch on rank 0, and exact resuming from it.

Building a trainer checks everything and writes nothing, so a run that cannot start leaves no folder behind;
``train`` writes (the log, TensorBoard, checkpoints).

A subclass (the learnt-metric ``Trainer``, the VoxelMorph ``VxmTrainer``) says what one batch does, which state
its checkpoint holds, and what it logs at the end of an epoch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from trainer.build import batch_seed, build_dataset, build_labels, build_loader
from trainer.checkpoint import is_pretrained_model, save_run_checkpoint
from trainer.finite import DivergenceGuard, NonFiniteError, describe_pairs, first_nonfinite, nonfinite_parameters
from trainer.monitor import TrainingMonitor
from trainer.run_folder import get_logger
from utils.config import RunConfig
from utils.distributed import Context, barrier

KEPT = "kept"  # the run folder's subfolder of kept checkpoints (trainer.keep_checkpoints)


def distributed(module: nn.Module, context: Context) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun (gradients averaged over ranks), else itself."""
    if not context.distributed:
        return module
    device = context.device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class BaseTrainer:
    """One training run in ``folder``; subclasses set ``checkpoint_kind`` and implement the hooks below."""

    checkpoint_kind: str
    progress_keys: tuple[str, ...]  # scalars of train_batch shown on the progress bar

    def __init__(self, config: RunConfig, folder: Path, context: Context):
        self.config, self.folder, self.context = config, Path(folder), context
        self.dataset = build_dataset(config, context)
        self.loader = build_loader(self.dataset, config, context, shuffle=True)
        self.labels = build_labels(config)  # evaluation structures of the training monitor
        self.start_epoch, self.step = 1, 0
        self.notes: list[str] = []  # what building found (resuming, pretrained weights), logged when training starts
        self.logger = self.writer = self.monitor = None  # made by train(): building writes nothing

    def train_batch(self, batch: dict, epoch: int, index: int) -> dict[str, float]:
        """One optimisation step on a batch (already seeded); returns the rank-averaged scalars to log."""
        raise NotImplementedError

    def checked_modules(self) -> dict[str, nn.Module]:
        """The modules that a step trains, by name for messages: their parameters must stay finite."""
        raise NotImplementedError

    def state(self) -> dict:
        """The state dicts that a checkpoint holds besides kind, version, epoch, step and config."""
        raise NotImplementedError

    def load_state(self, checkpoint: dict) -> None:
        """Restore what ``state`` saved."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        """Per-epoch logging before the checkpoint is written; every rank calls it."""

    def resume(self, checkpoint: dict) -> None:
        """Continue after the checkpoint's epoch, with its weights, optimiser states and step count; from a pretrained
        model's checkpoint, start at epoch 1 with its weights."""
        self.load_state(checkpoint)
        if not is_pretrained_model(checkpoint):
            self.start_epoch, self.step = checkpoint["epoch"] + 1, checkpoint["step"]
            self.notes.append(f"resuming after epoch {checkpoint['epoch']} (step {self.step})")

    def seed_batch(self, epoch: int, index: int) -> None:
        """Seed the batch's random numbers from (seed, epoch, batch, rank): a resumed run draws the same ones."""
        torch.manual_seed(batch_seed(self.config.seed, epoch, index, self.context.rank))

    def train(self) -> Path | None:
        """Run the remaining epochs; returns the path of the last checkpoint (None when nothing was left to do)."""
        self.logger = get_logger(self.folder, self.context, "train")
        self.writer = None
        if self.context.is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported only by the process that writes logs

            self.writer = SummaryWriter(str(self.folder / "log"))
        self.monitor = TrainingMonitor(self.writer, self.config, self.context, self.labels)
        for note in self.notes:
            self.logger.info(note)
        last, divergence = None, DivergenceGuard()
        for epoch in range(self.start_epoch, self.config.trainer.no_epochs + 1):
            self.loader.sampler.set_epoch(epoch)
            bar = tqdm(self.loader, desc=f"epoch {epoch}/{self.config.trainer.no_epochs}",
                       disable=None if self.context.is_main else True)  # None: only when stderr is a terminal
            for index, batch in enumerate(bar):
                self.seed_batch(epoch, index)
                values = self.train_batch(batch, epoch, index)
                self.step += 1
                self.check_finite(values, batch, epoch)
                for message in divergence(values):
                    self.logger.warning("step %d: %s", self.step, message)
                bar.set_postfix({key: f"{values[key]:.4g}" for key in self.progress_keys})
                if self.writer is not None:
                    for key, value in values.items():
                        self.writer.add_scalar(key, value, self.step)
            self.end_epoch(epoch)
            last = self._checkpoint(epoch)
        if self.writer is not None:
            self.writer.close()
        return last

    def check_finite(self, values: dict[str, float], batch: dict, epoch: int) -> None:
        """Stop the run, before anything of this step is saved, when a logged loss or a trained parameter is NaN or
        infinite (one read of the device per batch); the last checkpoint stays the last good one."""
        where = f"training stopped at epoch {epoch}, step {self.step} ({describe_pairs(batch['pair_id'])})"
        key = first_nonfinite(values)
        if key is not None:
            raise NonFiniteError(f"{where}: {key} is {values[key]}; is a learning rate too large?")
        for name, module in self.checked_modules().items():
            bad = nonfinite_parameters(module)
            if bad:
                raise NonFiniteError(f"{where}: the parameters of {name} became NaN or infinite ({', '.join(bad)}); "
                                     f"is a learning rate too large?")

    def _checkpoint(self, epoch: int) -> Path:
        """Checkpoint on rank 0 (atomically), then drop the previous one; every rank waits for it. The epochs of
        ``trainer.keep_checkpoints`` are also written to ``<run>/kept/``, which nothing deletes."""
        name = f"checkpoint_epoch{epoch}.pt"
        path = self.folder / "checkpoints" / name
        barrier(self.context)
        if self.context.is_main:
            contents = dict(kind=self.checkpoint_kind, epoch=epoch, step=self.step, config=self.config.to_dict(),
                            state=self.state())
            save_run_checkpoint(path, **contents)
            if epoch in self.config.trainer.keep_checkpoints:
                save_run_checkpoint(self.folder / KEPT / name, **contents)
            for old in path.parent.glob("checkpoint_epoch*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
            self.logger.info("epoch %d done, checkpoint %s", epoch, path)
        barrier(self.context)
        return path
