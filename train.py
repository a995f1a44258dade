"""Learn a similarity metric, or train VoxelMorph with one: ``[torchrun --nproc_per_node=N] train.py -c CONFIG
[-r CHECKPOINT]``.

The config's ``model.type`` says which: ``CNN_SSD`` / ``CNN_LCC`` learn a metric by q_v inference, ``VxmDense``
trains a VoxelMorph network.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint import VXM_CHECKPOINT_KIND, CheckpointError, from_a_run, load_training_checkpoint
from trainer.cli import add_common_arguments, run
from trainer.pretrained import resolve_checkpoint
from trainer.run_folder import create_run_folder, write_config
from trainer.trainer import Trainer
from trainer.vxm_trainer import VxmTrainer
from utils.config import apply_overrides, load_config, parse_config
from utils.distributed import setup, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", help="JSON config (with -r alone: the run's own config.json)")
    parser.add_argument("-r", "--resume", help="checkpoint to resume from; the run continues in its folder. With "
                                                "-c, pretrained:NAME starts a new run from that model's weights")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give a config (-c) or a checkpoint to resume (-r)")
    return args


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    context = setup(args.device, args.local_rank)
    try:
        checkpoint, folder = None, None
        if args.resume:
            path = resolve_checkpoint(args.resume)
            checkpoint = load_training_checkpoint(path, context.device)
            if from_a_run(checkpoint):  # the run continues in its folder
                folder = path.resolve().parent.parent
            elif not args.config:
                raise CheckpointError(f"{args.resume} is a pretrained model, not a run to resume: give a config "
                                      f"(-c) to start a new run from its weights")
        if args.config:
            config = load_config(args.config, args.set, mode="train")
        else:
            config = parse_config(apply_overrides(checkpoint["config"], args.set), folder, f"{args.resume} (config)",
                                  mode="train")
        if checkpoint is not None and (checkpoint["kind"] == VXM_CHECKPOINT_KIND) != (config.method == "voxelmorph"):
            what = "a VoxelMorph network" if checkpoint["kind"] == VXM_CHECKPOINT_KIND else "a learnt metric"
            raise CheckpointError(f"{args.resume}: the checkpoint holds {what}, but {config.source} is a "
                                  f"{config.kind}")
        if folder is None:
            folder = create_run_folder(config.trainer.save_dir, config.name, "train", context)
        if context.is_main:
            write_config(folder, config.to_dict())
        trainer = VxmTrainer if config.method == "voxelmorph" else Trainer
        last = trainer(config, folder, context, checkpoint).train()
        if context.is_main and last is not None:
            sys.stdout.write(f"checkpoint: {last}\nregister with it: python test.py -c CONFIG -r {last}\n")
        return last
    finally:
        teardown()


if __name__ == "__main__":
    run(main)
