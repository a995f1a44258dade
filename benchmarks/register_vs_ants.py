"""register.py against ANTs on SynthBrain pairs: Dice and wall time of the coarse-to-fine q_v schedule (register.py's
default on the CPU), the faithful schedule (the reference's iterations on one grid) and ANTsPy's SyN and SyNCC.

    python -m benchmarks.register_vs_ants --sizes 64 128 --pairs 4 1 --faithful-pairs 1 0 \
        --out benchmarks/results/register_vs_ants.json

Needs ANTsPy (``pip install -r benchmarks/requirements-ants.txt``; a benchmark-only dependency). Every method gets
the same files: the SynthBrain images at ``size``^3 (the 128^3 originals, or resampled over the same field of view:
images linearly, masks and segmentations by nearest neighbour), fixed sub-01, and runs its own affine step first
(ours: register()'s default; ANTs: the affine stages of SyN / SyNCC). Dice is computed by one function
(utils.metrics.dice) over the 15 structures of labels.json, on the fixed grid, for the moving segmentation warped by
each method's transformation (nearest neighbour). The methods run interleaved, pair by pair, so that the machine's
load falls on all of them alike; the load average is recorded with every run. Where the faithful schedule is not run
in full (``--faithful-pairs``), its time is estimated as its measured seconds per q_v iteration (over
``--time-iterations``) times its iteration count, and its Dice is not reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from data_loader.dataset import load_labels, read_pairs
from trainer.registration import register
from utils.io import atomic_write_text
from utils.metrics import dice

SYNTHBRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthbrain"
ANTS_TRANSFORMS = ("SyN", "SyNCC")


def resized_subject(source: Path, target: Path, size: int) -> dict[str, Path]:
    """A subject's im, mask and seg on a size^3 grid over the field of view of the original (corner voxel centres
    kept); the originals themselves when they are already that size."""
    files = {kind: source / f"{kind}.nii.gz" for kind in ("im", "mask", "seg")}
    original = sitk.ReadImage(str(files["im"]))
    if original.GetSize() == (size,) * 3:
        return files
    target.mkdir(parents=True, exist_ok=True)
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetOrigin(original.GetOrigin())
    reference.SetDirection(original.GetDirection())
    reference.SetSpacing([s * (n - 1) / (size - 1) for s, n in zip(original.GetSpacing(), original.GetSize())])
    resized = {}
    for kind, path in files.items():
        image = sitk.ReadImage(str(path))
        interpolator = sitk.sitkLinear if kind == "im" else sitk.sitkNearestNeighbor
        resized[kind] = target / f"{kind}.nii.gz"
        sitk.WriteImage(sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID()),
                        str(resized[kind]))
    return resized


def mean_dice(fixed_seg: np.ndarray, warped_seg: np.ndarray, labels: dict[str, int]) -> float:
    """Mean Dice over the structures of ``labels`` (arrays of one layout)."""
    return float(np.nanmean(dice(fixed_seg, warped_seg, list(labels.values()))))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_ours(fixed: dict, moving: dict, labels: dict, fixed_seg: np.ndarray, schedule: str,
             iterations: int | None = None) -> dict:
    before = load()
    start = time.perf_counter()
    result = register(fixed["im"], moving["im"], fixed_mask=fixed["mask"], fixed_seg=fixed["seg"],
                      moving_seg=moving["seg"], structures=labels, schedule=schedule, iterations=iterations,
                      device="cpu")
    seconds = time.perf_counter() - start
    seconds_part = result.summary["seconds"]
    return {"dice": mean_dice(fixed_seg, sitk.GetArrayFromImage(result.warped_seg), labels),
            "seconds": seconds, "seconds_registration": seconds_part["affine"] + seconds_part["nonrigid"],
            "seconds_nonrigid": seconds_part["nonrigid"], "q_v_levels": result.summary["q_v_levels"],
            "load_before": before, "load_after": load()}


def run_ants(fixed: dict, moving: dict, labels: dict, fixed_seg: np.ndarray, transform: str) -> dict:
    import ants  # the benchmark-only dependency

    before = load()
    fixed_image, moving_image = ants.image_read(str(fixed["im"])), ants.image_read(str(moving["im"]))
    start = time.perf_counter()
    result = ants.registration(fixed_image, moving_image, type_of_transform=transform)
    seconds = time.perf_counter() - start
    warped = ants.apply_transforms(fixed_image, ants.image_read(str(moving["seg"])), result["fwdtransforms"],
                                   interpolator="nearestNeighbor")
    warped_seg = np.rint(warped.numpy()).astype(np.int64).transpose(2, 1, 0)  # ANTsPy: (i, j, k); sitk: (k, j, i)
    return {"dice": mean_dice(fixed_seg, warped_seg, labels), "seconds": seconds, "seconds_registration": seconds,
            "load_before": before, "load_after": load()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SYNTHBRAIN)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--pairs", type=int, nargs="+", default=[9, 9], help="pairs per size (the first N of "
                        "pairs_dev.csv)")
    parser.add_argument("--faithful-pairs", type=int, nargs="+", default=[9, 9], help="pairs per size registered "
                        "with the faithful schedule in full (the others: time estimated)")
    parser.add_argument("--time-iterations", type=int, default=8, help="q_v iterations timed for the estimate")
    parser.add_argument("--ants", nargs="*", default=list(ANTS_TRANSFORMS), help="ANTsPy type_of_transform values")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ANTs uses its default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = load_labels(args.data / "labels.json")
    pairs = read_pairs(args.data / "pairs_dev.csv")
    record = {"command": "python -m benchmarks.register_vs_ants " + " ".join(argv or []),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": args.threads, "load_start": load(), "results": []}
    with tempfile.TemporaryDirectory() as scratch:
        for size, no_pairs, no_faithful in zip(args.sizes, args.pairs, args.faithful_pairs):
            for index, (fixed_id, moving_id) in enumerate(pairs[:no_pairs]):
                fixed = resized_subject(args.data / fixed_id, Path(scratch) / str(size) / fixed_id, size)
                moving = resized_subject(args.data / moving_id, Path(scratch) / str(size) / moving_id, size)
                fixed_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(fixed["seg"])))
                before = mean_dice(fixed_seg, sitk.GetArrayFromImage(sitk.ReadImage(str(moving["seg"]))), labels)
                entry = {"size": size, "pair": f"{fixed_id},{moving_id}", "dice_before": before, "methods": {}}
                entry["methods"]["pyramid"] = run_ours(fixed, moving, labels, fixed_seg, "pyramid")
                for transform in args.ants:
                    entry["methods"][f"ANTs {transform}"] = run_ants(fixed, moving, labels, fixed_seg, transform)
                if index < no_faithful:
                    entry["methods"]["faithful"] = run_ours(fixed, moving, labels, fixed_seg, "faithful")
                else:
                    timed = run_ours(fixed, moving, labels, fixed_seg, "faithful", iterations=args.time_iterations)
                    full = 1344  # the reference's SVF LCC iterations (register.py's default metric and model)
                    per_iteration = timed["seconds_nonrigid"] / args.time_iterations
                    entry["methods"]["faithful (estimated)"] = {
                        "seconds_per_iteration": per_iteration, "iterations": full,
                        "seconds_registration": per_iteration * full, "dice": None,
                        "load_before": timed["load_before"], "load_after": timed["load_after"]}
                record["results"].append(entry)
                print(json.dumps(entry), flush=True)
                atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    record["load_end"] = load()
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
