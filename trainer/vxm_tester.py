"""Registration by VoxelMorph: one forward pass per pair, then the same evaluation and files as a q_v registration
(without samples or uncertainty)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data_loader.dataset import PairDataset
from model.voxelmorph import VxmDense
from trainer.build import to_device
from trainer.checkpoint import CheckpointError
from trainer.tester import BaseTester
from utils.config import VxmTestConfig
from utils.distributed import Context


def check_input_shape(model: VxmDense, config: VxmTestConfig, source: str) -> None:
    """Fail unless the network takes inputs of the config's working grid (``data_loader.args.dims``)."""
    dims = list(config.data_loader.args.dims)
    if list(model.inshape) != dims:
        raise CheckpointError(f"{source}: the network takes inputs of shape {list(model.inshape)}, but "
                              f"{config.source} resizes the images to data_loader.args.dims {dims}; set them equal "
                              f"(e.g. --set data_loader.args.dims={list(model.inshape)})")


class VxmTester(BaseTester):
    """Registers every pair of the config with ``model`` (read from ``source``) and evaluates its transformation.

    ``dataset`` and ``labels`` replace the config's data and evaluation structures, as for ``BaseTester``.
    """

    transformation_name = "VoxelMorph"

    def __init__(self, config: VxmTestConfig, folder: Path, context: Context, model: VxmDense, source: str,
                 dataset: PairDataset | None = None, labels: dict[str, int] | None = None):
        check_input_shape(model, config, source)
        super().__init__(config, folder, context, dataset, labels)
        self.model = model.to(context.device).eval()
        self.notes.append((logging.INFO, f"VoxelMorph network from {source}: {model.config()}"))

    @torch.no_grad()
    def register_batch(self, batch: dict, index: int) -> tuple[torch.Tensor, None]:
        """The network's displacement (B, 3, *dims), voxel units: one forward pass (moving, fixed)."""
        device = self.context.device
        fixed, moving = to_device(batch["fixed"], device), to_device(batch["moving"], device)
        return self.model(moving["im"], fixed["im"]).displacement, None
