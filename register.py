"""Register two images with one command, or apply a saved transform.

    python register.py --fixed F --moving M -o OUT_DIR [--fixed-mask FM] [--fixed-seg FS --moving-seg MS]
                       [-r CHECKPOINT] [--metric SSD|LCC] [--model SVF|SVFFD] [--dims N [N N]]
                       [--iterations N] [--samples N] [--device cpu|cuda] [--set KEY.PATH=VALUE ...]
    python register.py apply --transform OUT_DIR/displacement_itk.nii.gz --image I --reference F -o O [--labels]

Images in any format SimpleITK reads (NIfTI, MHA/MHD, NRRD, ...) or MGZ, affinely pre-aligned to the fixed image.
-r takes a learnt metric (q_v registration) or a VoxelMorph network (one forward pass on the network's input shape).
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
from trainer.checkpoint import holds_voxelmorph, load_checkpoint, load_voxelmorph
from trainer.cli import add_common_arguments, run
from trainer.outputs import ITK_DISPLACEMENT
from trainer.pretrained import resolve_checkpoint
from trainer.registration import (METRICS, MODELS, PairFiles, apply_transform, reference_config, register_files,
                                  registration_config, vxm_registration_config)
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
    parser.add_argument("-r", "--checkpoint", help="learnt metric (a checkpoint of train.py or pretrained:NAME; "
                        "default: the baseline) or VoxelMorph network (our checkpoint, the authors' .tar.gz or the .pt "
                        "inside, or pretrained:VXM_*)")
    parser.add_argument("--metric", choices=METRICS, help=f"baseline metric (default {DEFAULT_METRIC}, or the "
                        "checkpoint's)")
    parser.add_argument("--model", choices=tuple(MODELS), help=f"transformation model (default {DEFAULT_MODEL}, "
                        "or the checkpoint's)")
    parser.add_argument("--dims", type=int, nargs="+", metavar="N", help="working grid, 1 or 3 sizes (default: "
                        "the fixed image's largest size, at most 128; a VoxelMorph network's input shape)")
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


Q_V_ONLY = ("metric", "model", "iterations", "samples")  # options of q_v registration, refused with a network


def check_vxm_args(args: argparse.Namespace) -> None:
    """Fail when an option of q_v registration is given with a VoxelMorph network."""
    given = [f"--{name}" for name in Q_V_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{args.checkpoint} is a VoxelMorph network: {', '.join(given)} "
                          f"{'applies' if len(given) == 1 else 'apply'} to q_v registration only; leave "
                          f"{'it' if len(given) == 1 else 'them'} out")


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
        path = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        checkpoint, network = None, None
        data_path = args.fixed.resolve().parent
        if path is not None and holds_voxelmorph(path):
            check_vxm_args(args)
            network = load_voxelmorph(path, context.device)[0], args.checkpoint
            config = vxm_registration_config(network[0].inshape, data_path, args.checkpoint, dims=args.dims,
                                             overrides=args.set)
        else:
            checkpoint = load_checkpoint(path, context.device) if path is not None else None
            fixed_shape, _ = read_image_header(args.fixed)
            config = registration_config(base_config(args, checkpoint), fixed_shape, data_path, model=args.model,
                                         dims=args.dims, iterations=args.iterations, samples=args.samples,
                                         overrides=args.set)
        structures = load_labels(args.structures) if args.structures else None
        files = PairFiles(args.fixed, args.moving, args.fixed_mask, args.fixed_seg, args.moving_seg)
        start = time.perf_counter()
        summary = register_files(files, args.output, config, context, checkpoint, structures, network)
        seconds = time.perf_counter() - start
    finally:
        teardown()
    if network is not None:
        method = f"VoxelMorph network {args.checkpoint}"
    else:
        metric = f"learnt {config.data_loss.type}" if checkpoint else f"baseline {config.data_loss.type}"
        method = f"{metric}, {config.transformation_module.type}, {config.trainer.no_iters_q_v} q_v iterations"
    print(f"registered {args.moving} to {args.fixed} in {seconds:.1f} s ({method}, working grid "
          f"{'x'.join(map(str, config.data_loader.args.dims))}); results in {args.output}")
    before, after = summary["mean_dice_before"], summary["mean_dice_after"]
    if before is not None and after is not None:
        print(f"mean Dice over {len(summary['structures'])} structures: before {before:.3f}, after {after:.3f}")
    return args.output


if __name__ == "__main__":
    run(main)
