"""Register images with a baseline or learnt metric: ``test.py -c CONFIG [-r CHECKPOINT]``.

Without ``-r`` the metric is the baseline (SSD or LCC of the config's data_loss).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint import is_pretrained_model, load_checkpoint
from trainer.cli import add_common_arguments, run
from trainer.pretrained import resolve_checkpoint
from trainer.run_folder import new_run_folder, started_run
from trainer.tester import Tester
from utils.config import load_config
from utils.distributed import setup, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", required=True, help="JSON config")
    parser.add_argument("-r", "--resume", help="checkpoint of a learnt metric, or pretrained:NAME (default: the "
                                                "baseline metric); the metric is the checkpoint's")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Check everything (device, config, checkpoint, data), then create the run folder and register; the folder's
    status becomes 'finished' only once every result is written."""
    args = parse_args(argv)
    context = setup(args.device, args.local_rank)
    try:
        config = load_config(args.config, args.set)
        checkpoint = load_checkpoint(resolve_checkpoint(args.resume), context.device) if args.resume else None
        if checkpoint is None and config.model.args.learnable:
            config.model.args.learnable = False  # no learnt weights: test with the baseline metric
            if context.is_main:
                sys.stderr.write(f"no checkpoint given (-r): registering with the baseline {config.data_loss.type}\n")
        if checkpoint is not None and is_pretrained_model(checkpoint) and context.is_main:
            sys.stderr.write(f"registering with the metric of {args.resume}: {checkpoint['similarity_config']}\n")
        folder = new_run_folder(config.trainer.save_dir, config.name, "test", context)
        tester = Tester(config, folder, context, checkpoint)
        with started_run(folder, config.to_dict(), context):
            tester.test()
        return folder
    finally:
        teardown()


if __name__ == "__main__":
    run(main)
