"""Training VoxelMorph (VxmDense) with a similarity metric as its loss: the baseline SSD / LCC, or a learnt metric
loaded frozen from a learnsim checkpoint. One Adam step per batch; the epoch loop, checkpoints, resuming,
TensorBoard and DistributedDataParallel are those of every training run (trainer.base)."""
from __future__ import annotations

from pathlib import Path

import torch

from model.similarity import SimilarityMetric
from model.voxelmorph import VxmDense
from model.voxelmorph_loss import VxmLoss
from trainer.base import BaseTrainer, distributed
from trainer.build import to_device
from trainer.checkpoint import (VXM_CHECKPOINT_KIND, CheckpointError, load_checkpoint, load_state,
                                similarity_from_checkpoint, vxm_state)
from trainer.pretrained import resolve_checkpoint
from utils.config import ConfigError, VxmTrainConfig
from utils.distributed import Context, all_reduce_mean


def build_vxm_similarity(config: VxmTrainConfig, map_location: str | torch.device = "cpu") -> SimilarityMetric:
    """The data term's metric: the baseline of ``data_loss.type``, or the learnt metric of ``data_loss.args.checkpoint``
    (a path or pretrained:NAME; of the same type)."""
    data_loss = config.data_loss
    if data_loss.args.checkpoint is None:
        return SimilarityMetric(data_loss.type, learnable=False)
    path = data_loss.args.checkpoint
    similarity = similarity_from_checkpoint(load_checkpoint(resolve_checkpoint(path), map_location), path)
    if similarity.kind != data_loss.type:
        raise ConfigError(f"{config.source}: data_loss.type: {data_loss.type}, but the metric in {path} is a learnt "
                          f"{similarity.kind}")
    return similarity


def build_vxm(config: VxmTrainConfig) -> VxmDense:
    """VxmDense for inputs of the config's dims."""
    args = config.model.args
    return VxmDense(config.data_loader.args.dims, args.nb_unet_features, args.int_steps, args.int_downsize)


class VxmTrainer(BaseTrainer):
    """One VoxelMorph training run in ``folder``; resumes from ``checkpoint`` (load_training_checkpoint) when given."""

    checkpoint_kind = VXM_CHECKPOINT_KIND
    progress_keys = ("vxm/loss", "vxm/data_term")

    def __init__(self, config: VxmTrainConfig, folder: Path, context: Context, checkpoint: dict | None = None):
        if not isinstance(config, VxmTrainConfig):
            raise ConfigError(f"{config.source}: not a VoxelMorph training config ({type(config).__name__})")
        super().__init__(config, folder, context)
        device = context.device
        torch.manual_seed(config.seed)  # the same config starts from the same network
        self.model = build_vxm(config).to(device)
        self.loss = VxmLoss(build_vxm_similarity(config, device), config.reg_loss.args.w_reg,
                            config.model.args.int_downsize).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optimizer.args.lr)
        if checkpoint is not None:
            self.resume(checkpoint)
        self.step_module = distributed(self.model, context)

    def checked_modules(self) -> dict[str, torch.nn.Module]:
        return {"the VoxelMorph network": self.model}

    def state(self) -> dict:
        return vxm_state(self.model, self.optimizer)

    def load_state(self, checkpoint: dict) -> None:
        source = checkpoint["source"]
        if checkpoint["voxelmorph"] != self.model.config():
            raise CheckpointError(f"{source}: its network {checkpoint['voxelmorph']} is not the config's "
                                  f"{self.model.config()}")
        self.model.load_weights(checkpoint["model_state"], source)
        load_state(self.optimizer, checkpoint, "optimizer")

    def train_batch(self, batch: dict, epoch: int, index: int) -> dict[str, float]:
        """One Adam step on the loss of a batch; returns the rank-averaged terms."""
        fixed, moving = to_device(batch["fixed"], self.context.device), to_device(batch["moving"], self.context.device)
        self.model.train()
        output = self.step_module(moving["im"], fixed["im"])
        terms = self.loss(fixed["im"], output.warped, output.velocity, fixed["mask"])
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        self.optimizer.step()
        displacement = output.displacement.detach()
        self.monitor.record(batch, displacement)
        if self.monitor.images_due(self.step + 1):
            self.monitor.write_images(batch, displacement, self.step + 1, "vxm")
        logged = all_reduce_mean(torch.stack([t.detach().mean() for t in terms.values()]), self.context).tolist()
        return dict(zip([f"vxm/{k}" for k in terms], logged))

    def end_epoch(self, epoch: int) -> None:
        if self.monitor.log_epoch_metrics(self.step):
            for name, parameter in self.model.named_parameters():
                self.writer.add_histogram(f"vxm/{name}", parameter.detach().cpu(), epoch)
            self.writer.flush()
