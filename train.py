"""Learn a similarity metric: ``[torchrun --nproc_per_node=N] train.py -c CONFIG [-r CHECKPOINT]``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.cli import add_common_arguments, run
from trainer.pretrained import resolve_checkpoint
from trainer.run_folder import create_run_folder, write_config
from trainer.trainer import Trainer
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
            checkpoint = load_checkpoint(path, context.device)
            if checkpoint["optimizer_q_phi"] is not None:  # a run's checkpoint: the run continues in its folder
                folder = path.resolve().parent.parent
            elif not args.config:
                raise CheckpointError(f"{args.resume} is a pretrained model, not a run to resume: give a config "
                                      f"(-c) to start a new run from its weights")
        if args.config:
            config = load_config(args.config, args.set)
        else:
            config = parse_config(apply_overrides(checkpoint["config"], args.set), folder, f"{args.resume} (config)")
        if folder is None:
            folder = create_run_folder(config.trainer.save_dir, config.name, "train", context)
        if context.is_main:
            write_config(folder, config.to_dict())
        last = Trainer(config, folder, context, checkpoint).train()
        if context.is_main and last is not None:
            sys.stdout.write(f"checkpoint: {last}\nregister with it: python test.py -c CONFIG -r {last}\n")
        return last
    finally:
        teardown()


if __name__ == "__main__":
    run(main)
