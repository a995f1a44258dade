"""Register two images with one command, or apply a saved transform.

    python register.py --fixed F --moving M -o OUT_DIR [--fixed-mask FM] [--fixed-seg FS --moving-seg MS]
                       [-r CHECKPOINT] [--metric SSD|LCC] [--model SVF|SVFFD] [--dims N [N N]]
                       [--iterations N] [--samples N] [--device cpu|cuda] [--set KEY.PATH=VALUE ...]
    python register.py apply --transform OUT_DIR/displacement_itk.nii.gz --image I --reference F -o O [--labels]

Images in any format SimpleITK reads (NIfTI, MHA/MHD, NRRD, ...) or MGZ, affinely pre-aligned to the fixed image.
The outputs are those of one test.py pair, on the fixed image's grid (README, "Register two images").
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from data_loader.dataset import load_labels
from data_loader.images import read_image_header
from trainer.checkpoint import load_checkpoint
from trainer.cli import add_common_arguments, run
from trainer.outputs import ITK_DISPLACEMENT
from trainer.pretrained import resolve_checkpoint
from trainer.registration import (METRICS, MODELS, PairFiles, apply_transform, reference_config, register_files,
                                  registration_config)
from utils.config import ConfigError
from utils.distributed import setup, teardown

DEFAULT_METRIC, DEFAULT_MODEL = "LCC", "SVF"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="python register.py apply -h: "
                                     "apply a saved transform to another image")
    parser.add_argument("--fixed", required=True, type=Path, help="fixed image (the outputs are on its grid)")
    parser.add_argument("--moving", required=True, type=Path, help="moving image")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--fixed-mask", type=Path, help="mask of the fixed image: the similarity is computed inside")
    parser.add_argument("--fixed-seg", type=Path, help="segmentation of the fixed image (for Dice)")
    parser.add_argument("--moving-seg", type=Path, help="segmentation of the moving image (warped, and for Dice)")
    parser.add_argument("--structures", type=Path, help="JSON structure name -> label id to evaluate (default: "
                        "every label of the segmentations)")
    parser.add_argument("-r", "--checkpoint", help="learnt metric: a checkpoint of train.py or pretrained:NAME "
                        "(default: the baseline)")
    parser.add_argument("--metric", choices=METRICS, help=f"baseline metric (default {DEFAULT_METRIC}, or the "
                        "checkpoint's)")
    parser.add_argument("--model", choices=tuple(MODELS), help=f"transformation model (default {DEFAULT_MODEL}, "
                        "or the checkpoint's)")
    parser.add_argument("--dims", type=int, nargs="+", metavar="N", help="working grid, 1 or 3 sizes (default: "
                        "the fixed image's largest size, at most 128)")
    parser.add_argument("--iterations", type=int, help="q_v iterations (default: the reference's, 1024 or 1344)")
    parser.add_argument("--samples", type=int, help="samples of q_v to warp and evaluate (default 5)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.dims is not None and len(args.dims) not in (1, 3):
        parser.error(f"--dims takes 1 or 3 sizes, got {len(args.dims)}")
    return args


def parse_apply_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="register.py apply", description="Resample an image through a saved "
                                     "transform onto the grid of a reference image.")
    parser.add_argument("--transform", required=True, type=Path, help=f"ITK displacement field ({ITK_DISPLACEMENT} "
                        "of register.py or test.py, or an ANTs warp)")
    parser.add_argument("--image", required=True, type=Path, help="image or label map to transform")
    parser.add_argument("--reference", required=True, type=Path, help="image whose grid the output takes (the fixed)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output file; format from its extension")
    parser.add_argument("--labels", action="store_true", help="a label map: nearest neighbour (default linear)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace, checkpoint: dict | None) -> dict:
    """The config the defaults come from: the checkpoint's (the setting its metric was learnt in), else the
    reference's baseline test config of --metric and --model.

    A checkpoint without a run config (a pretrained metric) gets the reference's config of its metric, learnable.
    """
    if checkpoint is None:
        return reference_config(args.metric or DEFAULT_METRIC, args.model or DEFAULT_MODEL)
    learnt = checkpoint["similarity"]["type"]
    if args.metric is not None and args.metric != learnt:
        raise ConfigError(f"{args.checkpoint}: the checkpoint holds a learnt {learnt} metric, not {args.metric}")
    if isinstance(checkpoint.get("config"), dict):
        return checkpoint["config"]
    config = reference_config(learnt, args.model or DEFAULT_MODEL)
    metric = checkpoint.get("similarity_config") or {}
    config["model"]["args"].update(learnable=True, **{key: metric[key] for key in ("s", "no_features")
                                                      if key in metric})
    return config


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["apply"]:
        args = parse_apply_args(argv[1:])
        path = apply_transform(args.transform, args.image, args.reference, args.output, args.labels)
        print(f"wrote {path}")
        return path
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.local_rank is not None:
        raise ConfigError("register.py registers one pair in one process: start it with python, not torchrun")
    context = setup(args.device)
    try:
        checkpoint = (load_checkpoint(resolve_checkpoint(args.checkpoint), context.device) if args.checkpoint
                      else None)
        fixed_shape, _ = read_image_header(args.fixed)
        config = registration_config(base_config(args, checkpoint), fixed_shape, args.fixed.resolve().parent,
                                     model=args.model, dims=args.dims, iterations=args.iterations,
                                     samples=args.samples, overrides=args.set)
        structures = load_labels(args.structures) if args.structures else None
        files = PairFiles(args.fixed, args.moving, args.fixed_mask, args.fixed_seg, args.moving_seg)
        start = time.perf_counter()
        summary = register_files(files, args.output, config, context, checkpoint, structures)
        seconds = time.perf_counter() - start
    finally:
        teardown()
    metric = f"learnt {config.data_loss.type}" if checkpoint else f"baseline {config.data_loss.type}"
    print(f"registered {args.moving} to {args.fixed} in {seconds:.1f} s ({metric}, "
          f"{config.transformation_module.type}, {config.trainer.no_iters_q_v} q_v iterations, working grid "
          f"{'x'.join(map(str, config.data_loader.args.dims))}); results in {args.output}")
    before, after = summary["mean_dice_before"], summary["mean_dice_after"]
    if before is not None and after is not None:
        print(f"mean Dice over {len(summary['structures'])} structures: before {before:.3f}, after {after:.3f}")
    return args.output


if __name__ == "__main__":
    run(main)
