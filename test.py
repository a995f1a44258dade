"""Register images: ``test.py -c CONFIG [-r CHECKPOINT]``.

With a q_v config (``model.type`` CNN_SSD / CNN_LCC), q_v inference per pair with the baseline metric, or with the
learnt metric of ``-r``. With a VoxelMorph config (``model.type`` VxmDense), one forward pass per pair of the
network of ``-r``: our VoxelMorph checkpoint, the authors' ``.tar.gz`` or the ``.pt`` inside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError, is_pretrained_model, load_checkpoint, load_voxelmorph
from trainer.cli import add_common_arguments, run
from trainer.pretrained import resolve_checkpoint
from trainer.run_folder import new_run_folder, started_run
from trainer.tester import Tester
from trainer.vxm_tester import VxmTester
from utils.config import load_config
from utils.distributed import setup, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", required=True, help="JSON config")
    parser.add_argument("-r", "--resume", help="checkpoint or pretrained:NAME: a learnt metric (q_v config; default: "
                                               "the baseline; a pretrained model brings its metric), or a VoxelMorph "
                                               "network (VoxelMorph config; required)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Check everything (device, config, checkpoint, data), then create the run folder and register; the folder's
    status becomes 'finished' only once every result is written."""
    args = parse_args(argv)
    context = setup(args.device, args.local_rank)
    try:
        config = load_config(args.config, args.set, mode="test")
        if config.method == "voxelmorph":
            if not args.resume:
                raise CheckpointError(f"{config.source} is a {config.kind}: give the network to test with -r")
            model, _ = load_voxelmorph(resolve_checkpoint(args.resume), context.device)
            folder = new_run_folder(config.trainer.save_dir, config.name, "test", context)
            tester = VxmTester(config, folder, context, model, args.resume)
        else:
            checkpoint = load_checkpoint(resolve_checkpoint(args.resume), context.device) if args.resume else None
            if checkpoint is None and config.model.args.learnable and context.is_main:
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
