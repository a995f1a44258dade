"""Accuracy benchmark: learn SSD/LCC metrics, register the pairs with baseline and learnt metrics, compare.

    python -m benchmarks.accuracy --configs configs/synthbrain --metrics SSD LCC \
        --out benchmarks/results/accuracy_synthbrain.json [--checkpoint SSD=PATH ...] [--set KEY=VALUE ...]

    python -m benchmarks.accuracy --protocol cpu [--metrics SSD LCC] [--set-train KEY=VALUE ...] [--set KEY=VALUE ...]

``--protocol cpu`` runs the CPU protocol of ``configs/synthbrain/cpu_protocol`` (train on five dev pairs, compare
on the four held out; see benchmarks/cpu_protocol.py) and writes to ``benchmarks/results/cpu_protocol/``.
Without ``--checkpoint`` the metric is trained first with ``config_train_<M>.json``. Every step is timed.
The tables report means over pairs and structures of the posterior-mean registration, and of the samples of q_v
(the figures the reference reported).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import test as test_script
import train as train_script
from benchmarks import cpu_protocol
from utils.io import atomic_write_text

QUANTITIES = ("dice", "asd_mm", "hd95_mm", "folding_percent_mask", "folding_voxels_reference", "log_jacobian_std")


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _summary(folder: Path) -> dict:
    """The metrics of a test run: overall means of the posterior mean and of the samples (what the reference
    reported), and per-structure mean Dice / ASD of the posterior mean."""
    summary = json.loads((folder / "summary.json").read_text())
    mean = summary["metrics"]["mean"]
    return {
        "overall": {q: mean[q]["mean"] for q in QUANTITIES},
        "before": {q: summary["metrics"]["identity"][q]["mean"] for q in ("dice", "asd_mm", "hd95_mm")},
        "samples": {q: summary["metrics"]["samples"][q]["mean"] for q in QUANTITIES},
        "per_structure": {name: {q: values["mean"][q] for q in ("dice", "asd_mm")}
                          for name, values in summary["per_structure"].items()},
        "uncertainty": {k: v for k, v in summary["uncertainty"].items() if k != "per_pair"},
        "folder": os.path.relpath(folder),
    }


def run_metric(configs: Path, metric: str, checkpoint: str | None, overrides: list[str],
               baseline_only: bool = False) -> dict:
    """Train (unless a checkpoint is given), then register with the baseline and the learnt metric.

    ``overrides`` (``KEY.PATH=VALUE``) apply to both registration runs, not to training. ``baseline_only``: register
    with the baseline metric only (no training).
    """
    folder = configs / metric
    sets = [arg for item in overrides for arg in ("--set", item)]
    result: dict = {"metric": metric, "test_overrides": overrides}
    if baseline_only:
        baseline, result["test_baseline_seconds"] = _timed(
            test_script.main, ["-c", str(folder / f"config_test_baseline_{metric}.json"), *sets])
        result["baseline"] = _summary(baseline)
        return result
    if checkpoint is None:
        checkpoint, result["train_seconds"] = _timed(train_script.main, ["-c", str(folder / f"config_train_{metric}.json")])
    result["checkpoint"] = os.path.relpath(checkpoint)
    baseline, result["test_baseline_seconds"] = _timed(
        test_script.main, ["-c", str(folder / f"config_test_baseline_{metric}.json"), *sets])
    learnt, result["test_learnt_seconds"] = _timed(
        test_script.main, ["-c", str(folder / f"config_test_learnt_{metric}.json"), "-r", str(checkpoint), *sets])
    result["baseline"], result["learnt"] = _summary(baseline), _summary(learnt)
    result["learnt_minus_baseline"] = {q: result["learnt"]["overall"][q] - result["baseline"]["overall"][q]
                                       for q in QUANTITIES}
    return result


def table(results: list[dict]) -> str:
    """Markdown table: overall and per-structure Dice / ASD, baseline vs learnt."""
    lines = ["| metric | structure | Dice baseline | Dice learnt | diff | ASD baseline (mm) | ASD learnt (mm) | diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if any("learnt" not in r for r in results):
        return baseline_table(results)
    for r in results:
        rows = [("**all**", r["baseline"]["overall"], r["learnt"]["overall"])]
        rows += [(name, r["baseline"]["per_structure"][name], r["learnt"]["per_structure"][name])
                 for name in r["baseline"]["per_structure"]]
        for name, b, l in rows:
            lines.append(f"| {r['metric']} | {name} | {b['dice']:.3f} | {l['dice']:.3f} | {l['dice'] - b['dice']:+.3f} "
                         f"| {b['asd_mm']:.3f} | {l['asd_mm']:.3f} | {l['asd_mm'] - b['asd_mm']:+.3f} |")
    lines.append("")
    lines.append("| metric | Dice before | Dice samples baseline | Dice samples learnt | ASD samples baseline | "
                 "ASD samples learnt | det J < 0 voxels (reference) baseline | learnt | std log detJ baseline | "
                 "learnt |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        b, l = r["baseline"], r["learnt"]
        lines.append(f"| {r['metric']} | {b['before']['dice']:.3f} | {b['samples']['dice']:.3f} | "
                     f"{l['samples']['dice']:.3f} | {b['samples']['asd_mm']:.3f} | {l['samples']['asd_mm']:.3f} | "
                     f"{b['overall']['folding_voxels_reference']:.1f} | "
                     f"{l['overall']['folding_voxels_reference']:.1f} | "
                     f"{b['overall']['log_jacobian_std']:.4f} | {l['overall']['log_jacobian_std']:.4f} |")
    return "\n".join(lines)


def baseline_table(results: list[dict]) -> str:
    """Markdown table of baseline-only runs: Dice / ASD before, of the posterior mean and of the samples."""
    lines = ["| metric | structure | Dice before | Dice mean | Dice samples | ASD mean (mm) | ASD samples (mm) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        b = r["baseline"]
        lines.append(f"| {r['metric']} | **all** | {b['before']['dice']:.3f} | {b['overall']['dice']:.3f} | "
                     f"{b['samples']['dice']:.3f} | {b['overall']['asd_mm']:.3f} | {b['samples']['asd_mm']:.3f} |")
        for name, values in b["per_structure"].items():
            lines.append(f"| {r['metric']} | {name} | | {values['dice']:.3f} | | {values['asd_mm']:.3f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=Path("configs/synthbrain"))
    parser.add_argument("--metrics", nargs="+", default=["SSD", "LCC"], choices=["SSD", "LCC"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="METRIC=PATH",
                        help="use this learnt metric instead of training one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="config override for the registration runs (repeatable)")
    parser.add_argument("--baseline-only", action="store_true", help="register with the baseline metrics only")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/accuracy_synthbrain.json); with --protocol cpu a "
                             "folder (default benchmarks/results/cpu_protocol)")
    parser.add_argument("--protocol", choices=["cpu"], help="run the CPU protocol (train / held-out split)")
    parser.add_argument("--set-train", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="--protocol cpu: config override for training (repeatable)")
    parser.add_argument("--train-run", action="append", default=[], metavar="METRIC[:frozen]=FOLDER",
                        help="--protocol cpu: reuse this finished training run (with its halfway/ checkpoint), or "
                             "with :frozen this finished control run (theta frozen)")
    parser.add_argument("--test-run", action="append", default=[], metavar="METRIC:KIND=FOLDER",
                        help="--protocol cpu: reuse this finished test run; KIND is baseline or learnt")
    args = parser.parse_args(argv)
    if args.protocol == "cpu":
        reuse = dict(item.split("=", 1) for item in args.test_run)
        reuse.update({key if ":" in key else f"{key}:train": folder
                      for key, folder in (item.split("=", 1) for item in args.train_run)})
        return cpu_protocol.main(args.metrics, args.set_train, args.set, reuse,
                                 args.out or Path("benchmarks/results/cpu_protocol"))
    args.out = args.out or Path("benchmarks/results/accuracy_synthbrain.json")
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    results = [run_metric(args.configs, metric, checkpoints.get(metric), args.set, args.baseline_only)
               for metric in args.metrics]
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")},
              "results": results, "table": table(results)}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
