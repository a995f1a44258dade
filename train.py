"""Learn a similarity metric: ``[torchrun --nproc_per_node=N] train.py -c CONFIG [-r CHECKPOINT]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError, is_pretrained_model, load_checkpoint, resume_config
from trainer.cli import add_common_arguments, run
from trainer.pretrained import resolve_checkpoint
from trainer.run_folder import new_run_folder, resumed_run_folder, started_run
from trainer.trainer import Trainer
from utils.config import load_config
from utils.distributed import setup, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", help="JSON config (with -r: must agree with the run's config on every "
                                               "key that a resumed run may not change)")
    parser.add_argument("-r", "--resume", help="checkpoint to resume from; the run continues in its folder. With "
                                               "-c, pretrained:NAME starts a new run from that model's weights")
    parser.add_argument("--reset-q-v", action="store_true",
                        help="with -r: start every pair's q_v afresh instead of from its saved state")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give a config (-c) or a checkpoint to resume (-r)")
    if args.reset_q_v and not args.resume:
        parser.error("--reset-q-v only applies when resuming (-r)")
    return args


def main(argv: list[str] | None = None) -> Path | None:
    """Check everything (device, config, checkpoint, data, q_v states), then create or reopen the run folder
    and train; a run that cannot start writes nothing."""
    args = parse_args(argv)
    context = setup(args.device, args.local_rank)
    try:
        checkpoint, path = None, None
        if args.resume:
            path = resolve_checkpoint(args.resume)
            checkpoint = load_checkpoint(path, context.device)
        pretrained = checkpoint is not None and is_pretrained_model(checkpoint)
        if checkpoint is not None and not pretrained:
            folder = resumed_run_folder(path)
            config = resume_config(checkpoint, args.config, args.set)
        else:
            if pretrained and not args.config:
                raise CheckpointError(f"{args.resume} is a pretrained model, not a run to resume: give a config "
                                      f"(-c) to start a new run from its weights")
            config = load_config(args.config, args.set)
            folder = new_run_folder(config.trainer.save_dir, config.name, "train", context)
        trainer = Trainer(config, folder, context, checkpoint, reset_q_v=args.reset_q_v)
        with started_run(folder, config.to_dict(), context, resumed=checkpoint is not None and not pretrained):
            last = trainer.train()
        if context.is_main and last is not None:
            sys.stdout.write(f"checkpoint: {last}\nregister with it: python test.py -c CONFIG -r {last}\n")
        return last
    finally:
        teardown()


if __name__ == "__main__":
    run(main)
