"""Register two images with one command, or apply a saved transform.

    python register.py --fixed F --moving M (-o OUT_DIR | --output-prefix PREFIX) [--fixed-mask FM]
                       [--fixed-seg FS --moving-seg MS] [--affine mattes|correlation|none] [--initial-transform T]
                       [-r CHECKPOINT] [--metric SSD|LCC] [--model SVF|SVFFD] [--schedule pyramid|faithful]
                       [--dims N [N N]] [--iterations N] [--samples N] [--device cpu|cuda] [--set KEY.PATH=VALUE ...]
    python register.py apply --transform OUT_DIR/displacement_itk.nii.gz --image I --reference F -o O [--labels]

Images in any format SimpleITK reads (NIfTI, MHA/MHD, NRRD, ...) or MGZ. An affine step comes first (SimpleITK,
Mattes mutual information by default), then the non-rigid q_v registration (or a VoxelMorph network with -r). The
outputs are on the fixed image's grid, with ANTs' names for the transforms (README, "Register two images"). This is
a command line for trainer.registration.register.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from trainer.cli import add_common_arguments, run
from trainer.registration import (AFFINE, CONFIG, DET_JACOBIAN, DISPLACEMENT_ITK, DISPLACEMENT_STD, INVERSE_WARP,
                                  METRICS_CSV, SUMMARY, WARP, WARPED_IM, WARPED_SEG, apply_transform, register)
from trainer.registration_config import DEFAULT_METRIC, DEFAULT_MODEL, METRICS, MODELS, SCHEDULES
from utils.affine import AFFINE_METRICS
from utils.config import ConfigError
from utils.io import exclusive_lock

OUTPUTS = (WARPED_IM, WARPED_SEG, AFFINE, WARP, INVERSE_WARP, DISPLACEMENT_ITK, DISPLACEMENT_STD, DET_JACOBIAN,
           METRICS_CSV, SUMMARY, CONFIG)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="python register.py apply -h: "
                                     "apply a saved transform to another image")
    parser.add_argument("--fixed", required=True, type=Path, help="fixed image (the outputs are on its grid)")
    parser.add_argument("--moving", required=True, type=Path, help="moving image")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("-o", "--output", type=Path, help="output folder (new or empty)")
    output.add_argument("--output-prefix", help="prefix of every output file, as antsRegistration's -o: "
                        "out/pair_ writes out/pair_warped_im.nii.gz, out/pair_0GenericAffine.mat, ...")
    parser.add_argument("--fixed-mask", type=Path, help="mask of the fixed image: the similarity is computed inside")
    parser.add_argument("--fixed-seg", type=Path, help="segmentation of the fixed image (for Dice)")
    parser.add_argument("--moving-seg", type=Path, help="segmentation of the moving image (warped, and for Dice)")
    parser.add_argument("--structures", type=Path, help="JSON structure name -> label id to evaluate (default: "
                        "every label of the segmentations)")
    parser.add_argument("--affine", choices=(*AFFINE_METRICS, "none"), default="mattes",
                        help="metric of the affine step before the non-rigid one (SimpleITK, rigid then affine, 3 "
                        "levels): Mattes mutual information (default) or correlation; none: skip it (the images "
                        "must then be aligned, or --initial-transform aligns them)")
    parser.add_argument("--initial-transform", type=Path, help="ITK/ANTs affine transform (.mat, .tfm, .txt), fixed "
                        "-> moving points: the affine step starts from it (with --affine none, it is the affine "
                        "step)")
    parser.add_argument("-r", "--checkpoint", help="learnt metric (a checkpoint of train.py or pretrained:NAME; "
                        "default: the baseline) or VoxelMorph network (our checkpoint, the authors' .tar.gz or the .pt "
                        "inside, or pretrained:VXM_*)")
    parser.add_argument("--metric", choices=METRICS, help=f"baseline metric (default {DEFAULT_METRIC}, or the "
                        "checkpoint's)")
    parser.add_argument("--model", choices=tuple(MODELS), help=f"transformation model (default {DEFAULT_MODEL}, "
                        "or the checkpoint's)")
    parser.add_argument("--schedule", choices=SCHEDULES, help="q_v inference: coarse to fine with a convergence "
                        "stop (pyramid, beyond the paper; the default on the CPU) or the reference's iterations on "
                        "the working grid (faithful; the default on CUDA and for SVFFD)")
    parser.add_argument("--dims", type=int, nargs="+", metavar="N", help="working grid, 1 or 3 sizes (default: "
                        "the fixed image's largest size, at most 128; a VoxelMorph network's input shape)")
    parser.add_argument("--iterations", type=int, help="q_v iterations (default: the reference's, 1024 or 1344; "
                        "with the pyramid, the most per level)")
    parser.add_argument("--samples", type=int, help="samples of q_v for the uncertainty map (default 5)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.dims is not None and len(args.dims) not in (1, 3):
        parser.error(f"--dims takes 1 or 3 sizes, got {len(args.dims)}")
    return args


def parse_apply_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="register.py apply", description="Resample an image through a saved "
                                     "transform onto the grid of a reference image.")
    parser.add_argument("--transform", required=True, type=Path, help=f"ITK displacement field ({DISPLACEMENT_ITK} "
                        "of register.py or test.py, or an ANTs warp)")
    parser.add_argument("--image", required=True, type=Path, help="image or label map to transform")
    parser.add_argument("--reference", required=True, type=Path, help="image whose grid the output takes (the fixed)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output file; format from its extension")
    parser.add_argument("--labels", action="store_true", help="a label map: nearest neighbour (default linear)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def output_prefix(args: argparse.Namespace) -> str:
    """The prefix of the output files: ``OUT_DIR/`` or --output-prefix."""
    return f"{args.output}{os.sep}" if args.output is not None else args.output_prefix


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before anything runs when an output would overwrite something."""
    if args.output is not None:
        if args.output.is_symlink():
            raise ValueError(f"output {args.output} is a symbolic link: give the folder it points to, or a new one")
        if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
            raise ValueError(f"output {args.output} exists and is not an empty folder: choose another or remove it")
        return
    prefix = args.output_prefix
    if not prefix:
        raise ValueError("--output-prefix is empty: give a prefix such as out/pair_")
    taken = [prefix + name for name in OUTPUTS if Path(prefix + name).exists()]
    if taken:
        raise ValueError(f"--output-prefix {prefix}: {taken[0]} exists; choose another prefix or remove it")


def output_lock(args: argparse.Namespace) -> Path:
    """The lock file of an output folder or prefix: hidden, in the nearest folder that exists already (so that no
    folder is made before the run), named after the output."""
    target = Path(os.path.abspath(output_prefix(args)))
    folder = next(parent for parent in target.parents if parent.is_dir())
    return folder / f".register-{hashlib.sha256(str(target).encode()).hexdigest()[:16]}.lock"


def save_atomically(result, args: argparse.Namespace) -> None:
    """Write the outputs into a hidden folder, then move them into place: a failed or interrupted run leaves
    nothing behind."""
    final = Path(output_prefix(args))
    parent = args.output.parent if args.output is not None else (final.parent if final.name else final)
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".register-partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        result.save(f"{staging}{os.sep}")
        if args.output is not None:
            if args.output.exists():
                args.output.rmdir()
            staging.rename(args.output)
        else:
            for path in sorted(staging.iterdir()):
                path.rename(args.output_prefix + path.name)
    except OSError as error:  # named by the output the user asked for, not by its hidden staging copy
        if error.filename is None or Path(error.filename).parent != staging:
            raise
        raise OSError(error.errno, error.strerror, output_prefix(args) + Path(error.filename).name) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["apply"]:
        args = parse_apply_args(argv[1:])
        path = apply_transform(args.transform, args.image, args.reference, args.output, args.labels)
        print(f"wrote {path}")
        return str(path)
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.local_rank is not None:
        raise ConfigError("register.py registers one pair in one process: start it with python, not torchrun")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    check_outputs(args)
    # one process per output for the whole run (a second one is refused before it registers); checked again under it
    with exclusive_lock(output_lock(args), f"output {output_prefix(args)}"):
        check_outputs(args)
        print(f"registering {args.moving} to {args.fixed}", flush=True)
        result = register(args.fixed, args.moving, fixed_mask=args.fixed_mask, fixed_seg=args.fixed_seg,
                          moving_seg=args.moving_seg, affine=args.affine, initial_transform=args.initial_transform,
                          checkpoint=args.checkpoint, metric=args.metric, model=args.model, schedule=args.schedule,
                          dims=args.dims, iterations=args.iterations, samples=args.samples,
                          structures=args.structures, device=args.device, overrides=args.set, progress=True)
        save_atomically(result, args)
    summary = result.summary
    levels = ", ".join(f"{'x'.join(map(str, level['shape']))}: {level['iterations']}"
                       for level in summary.get("q_v_levels", []))
    print(f"registered {args.moving} to {args.fixed} in {summary['seconds']['total']:.1f} s (affine step "
          f"{summary['seconds']['affine']:.1f} s; {summary['method']}, working grid "
          f"{'x'.join(map(str, summary['working_grid']))}{f'; q_v iterations {levels}' if levels else ''}); "
          f"results in {output_prefix(args)}")
    if summary["mean_dice_before"] is not None:
        print(f"mean Dice over {len(summary['structures'])} structures on the fixed grid: before "
              f"{summary['mean_dice_before']:.3f}, after the affine step {summary['mean_dice_affine']:.3f}, after "
              f"{summary['mean_dice_after']:.3f}")
    return output_prefix(args)


if __name__ == "__main__":
    run(main)
