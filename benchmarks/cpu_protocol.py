"""The CPU protocol of ``configs/synthbrain/cpu_protocol``: train on five dev pairs, register the four held out.

    python -m benchmarks.accuracy --protocol cpu [--metrics SSD LCC] [--set-train KEY=VALUE ...] [--set KEY=VALUE ...]

Per metric: train in two legs (to half the epochs, then resumed to the end, keeping the halfway checkpoint for the
feature figure); train the control run, the same config with theta and q_f frozen (``trainer.freeze_theta``), whose
curve separates what theta does from what the warm-started q_v iterations do; register the held-out pairs with the
baseline and with the learnt metric, and compare them pair by pair (Wilcoxon signed-rank test). Writes
``<out>/cpu_protocol.json``, ``<out>/curves.png`` (mean Dice and ASD of the posterior mean on the training pairs
against the theta step, from TensorBoard, learnt and frozen) and ``<out>/features.png`` (mid-slices of f(F) at steps
0, N/2 and N). ``--train-run M=FOLDER``, ``--train-run M:frozen=FOLDER`` and ``--test-run M:baseline=FOLDER`` /
``M:learnt=FOLDER`` reuse finished runs instead of starting them.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import wilcoxon
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import test as test_script
import train as train_script
from benchmarks.theta_analysis import describe_run, only_checkpoint, similarity_at
from trainer.build import build_dataset
from trainer.checkpoint import load_checkpoint
from utils.config import load_config
from utils.distributed import Context
from utils.figures import mid_slices
from utils.io import atomic_write, atomic_write_text

PROTOCOL = Path("configs/synthbrain/cpu_protocol")
CURVES = ("epoch/dice", "epoch/asd_mm")


def _pairs(path: Path) -> list[str]:
    """Pair ids ``<fixed>_<moving>`` of a ``fixed,moving`` CSV."""
    with open(path, newline="") as handle:
        return [f"{row[0].strip()}_{row[1].strip()}" for row in csv.reader(handle) if row]


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def train_two_legs(config: Path, pairs: Path, overrides: list[str]) -> tuple[Path, Path, float]:
    """Train to half the epochs, keep that checkpoint (``<run>/halfway/``), resume to the end.

    Returns the final checkpoint, the kept halfway checkpoint and the wall time in seconds.
    """
    sets = ["--set", f"data_loader.args.im_pairs={pairs.resolve()}"]
    sets += [arg for item in overrides for arg in ("--set", item)]
    epochs = load_config(config, sets[1::2]).trainer.no_epochs
    start = time.perf_counter()
    half = train_script.main(["-c", str(config), *sets, "--set", f"trainer.no_epochs={max(1, epochs // 2)}"])
    kept = half.parent.parent / "halfway" / half.name
    kept.parent.mkdir(exist_ok=True)
    shutil.copy2(half, kept)
    final = (half if max(1, epochs // 2) >= epochs
             else train_script.main(["-r", str(half), "--set", f"trainer.no_epochs={epochs}"]))
    return final, kept, time.perf_counter() - start


def train_frozen(config: Path, pairs: Path, overrides: list[str]) -> tuple[Path, float]:
    """The control run: ``config`` with ``trainer.freeze_theta``; returns its last checkpoint and the wall time."""
    sets = [f"data_loader.args.im_pairs={pairs.resolve()}", *overrides, "trainer.freeze_theta=true"]
    return _timed(train_script.main, ["-c", str(config), *[arg for item in sets for arg in ("--set", item)]])


def per_pair(folder: Path) -> dict[str, dict[str, float]]:
    """Mean over structures of Dice and ASD (posterior mean) per pair, from a test run's metrics.csv."""
    values: dict[str, dict[str, list[float]]] = {}
    with open(folder / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["sample"] != "mean" or row["status"] != "ok":
                continue
            pair = values.setdefault(row["pair_id"], {"dice": [], "asd_mm": []})
            for key in pair:
                pair[key].append(float(row[key]))
    return {pid: {k: float(np.nanmean(v)) for k, v in pair.items()} for pid, pair in values.items()}


def paired_test(baseline: dict, learnt: dict, pairs: list[str]) -> dict:
    """Per-pair learnt - baseline differences of Dice and ASD and their two-sided Wilcoxon signed-rank p-values.

    With n pairs the smallest attainable two-sided p is 2 / 2^n (0.125 for four pairs)."""
    pairs = [p for p in pairs if p in baseline and p in learnt]
    result = {"pairs": pairs, "smallest_attainable_p": 2.0 / 2 ** len(pairs) if pairs else None}
    for key in ("dice", "asd_mm"):
        diffs = [learnt[p][key] - baseline[p][key] for p in pairs]
        test = wilcoxon(diffs) if pairs and any(d != 0 for d in diffs) else None
        result[key] = {"differences": diffs, "mean_difference": float(np.mean(diffs)) if diffs else None,
                       "wilcoxon_statistic": None if test is None else float(test.statistic),
                       "wilcoxon_p": None if test is None else float(test.pvalue)}
    return result


def curves(run: Path) -> dict[str, list[list[float]]]:
    """The per-epoch TensorBoard scalars of a training run: ``{tag: [[step, value], ...]}``."""
    events = EventAccumulator(str(run / "log"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in CURVES if tag in tags}


@torch.no_grad()
def feature_slices(config: Path, pairs: Path, checkpoints: list[Path | None]) -> list[list[np.ndarray]]:
    """Mid-slices of f(F) of the atlas (the fixed image of the first pair of ``pairs``), for the Dirac
    initialisation (None) and for each checkpoint."""
    settings = load_config(config, [f"data_loader.args.im_pairs={pairs.resolve()}"])
    fixed = build_dataset(settings, Context(0, 1, 0, torch.device("cpu")))[0]["fixed"]["im"][None]
    return [mid_slices(similarity_at(settings, path).features(fixed)[0, 0].numpy()) for path in checkpoints]


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


def curves_figure(path: Path, results: list[dict]) -> None:
    """Mean Dice and ASD of the posterior mean on the training pairs against the theta step: per metric, the learnt
    run (solid) and the control run with theta frozen (dashed)."""
    figure = Figure(figsize=(9, 3.5))
    for column, (tag, label) in enumerate(zip(CURVES, ("Dice", "ASD (mm)"))):
        axes = figure.add_subplot(1, 2, column + 1)
        for colour, r in enumerate(results):
            for key, style, name in (("curves", "-", "learnt"), ("curves_frozen", "--", "theta frozen")):
                points = np.array(r.get(key, {}).get(tag, []))
                if len(points):
                    axes.plot(points[:, 0], points[:, 1], style, color=f"C{colour}", marker="o", markersize=2,
                              label=f"{r['metric']}, {name}")
        axes.set_xlabel("theta step")
        axes.set_ylabel(f"{label}, training pairs")
        axes.legend(fontsize=8)
    figure.suptitle("posterior mean after each epoch's q_v inference (warm-started)")
    figure.tight_layout()
    _save(figure, path)


def features_figure(path: Path, results: list[dict]) -> None:
    """Rows: metric x (step 0, N/2, N); columns: the three mid-slices of f(F)."""
    rows = [(r["metric"], step, slices) for r in results for step, slices in zip(r["feature_steps"], r["features"])]
    figure = Figure(figsize=(7, 2.2 * len(rows)))
    for i, (metric, step, slices) in enumerate(rows):
        for j, image in enumerate(slices):
            axes = figure.add_subplot(len(rows), 3, 3 * i + j + 1)
            axes.imshow(image, cmap="gray", origin="lower")
            axes.set_xticks([])
            axes.set_yticks([])
            if j == 0:
                axes.set_ylabel(f"{metric}, step {step}", fontsize=8)
    figure.suptitle("f(F): mid-slices of the learnt features of the atlas")
    figure.tight_layout()
    _save(figure, path)


def run_metric(metric: str, train_overrides: list[str], test_overrides: list[str], reuse: dict[str, str]) -> dict:
    """Train (or reuse a run), register the held-out pairs with baseline and learnt metric, compare per pair."""
    folder = PROTOCOL / metric
    config = folder / f"config_train_{metric}.json"
    held_out = PROTOCOL / "pairs_held_out.csv"
    result: dict = {"metric": metric, "train_overrides": train_overrides, "test_overrides": test_overrides}
    if f"{metric}:train" in reuse:
        run = Path(reuse[f"{metric}:train"])
        final, kept = only_checkpoint(run / "checkpoints"), only_checkpoint(run / "halfway")
    else:
        final, kept, result["train_seconds"] = train_two_legs(config, PROTOCOL / "pairs_train.csv", train_overrides)
        run = final.parent.parent
    result["train_run"] = os.path.relpath(run)
    if f"{metric}:frozen" in reuse:
        frozen = Path(reuse[f"{metric}:frozen"])
    else:
        final_frozen, result["train_frozen_seconds"] = train_frozen(config, PROTOCOL / "pairs_train.csv",
                                                                    train_overrides)
        frozen = final_frozen.parent.parent
    result["train_frozen_run"] = os.path.relpath(frozen)
    sets = ["--set", f"data_loader.args.im_pairs={held_out.resolve()}"]
    sets += [arg for item in test_overrides for arg in ("--set", item)]
    tests = {}
    for kind, extra in (("baseline", []), ("learnt", ["-r", str(final)])):
        if f"{metric}:{kind}" in reuse:
            tests[kind] = Path(reuse[f"{metric}:{kind}"])
        else:
            tests[kind], result[f"test_{kind}_seconds"] = _timed(
                test_script.main, ["-c", str(folder / f"config_test_{kind}_{metric}.json"), *extra, *sets])
        result[f"test_{kind}_run"] = os.path.relpath(tests[kind])
    baseline, learnt = per_pair(tests["baseline"]), per_pair(tests["learnt"])
    result["per_pair"] = {"baseline": baseline, "learnt": learnt}
    result["held_out"] = paired_test(baseline, learnt, _pairs(held_out))
    result["uncertainty"] = {kind: json.loads((tests[kind] / "summary.json").read_text())["uncertainty"]["mean"]
                             for kind in tests}
    result["curves"] = curves(run)
    result["curves_frozen"] = curves(frozen)
    steps = [0, load_checkpoint(kept)["step"], load_checkpoint(final)["step"]]
    result["feature_steps"] = steps
    result["features"] = feature_slices(config, held_out, [None, kept, final])
    result["theta"] = describe_run(run, aligned_run=frozen)
    return result


def table(results: list[dict]) -> str:
    """Markdown: per held-out pair Dice / ASD (posterior mean, mean over structures), baseline vs learnt, and the
    Wilcoxon p-values."""
    lines = ["| metric | pair | Dice baseline | Dice learnt | diff | ASD baseline (mm) | ASD learnt (mm) | diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        b, l = r["per_pair"]["baseline"], r["per_pair"]["learnt"]
        for pid in r["held_out"]["pairs"]:
            lines.append(f"| {r['metric']} | {pid} | {b[pid]['dice']:.3f} | {l[pid]['dice']:.3f} | "
                         f"{l[pid]['dice'] - b[pid]['dice']:+.3f} | {b[pid]['asd_mm']:.3f} | {l[pid]['asd_mm']:.3f} | "
                         f"{l[pid]['asd_mm'] - b[pid]['asd_mm']:+.3f} |")
        h = r["held_out"]
        p = {k: "n/a" if h[k]["wilcoxon_p"] is None else f"{h[k]['wilcoxon_p']:.3f}" for k in ("dice", "asd_mm")}
        lines.append(f"| {r['metric']} | **Wilcoxon p** (smallest attainable {h['smallest_attainable_p']:.3f}) | | | "
                     f"{p['dice']} | | | {p['asd_mm']} |")
    return "\n".join(lines)


def main(metrics: list[str], train_overrides: list[str], test_overrides: list[str], reuse: dict[str, str],
         out: Path) -> dict:
    start = time.perf_counter()
    results = [run_metric(m, train_overrides, test_overrides, reuse) for m in metrics]
    out.mkdir(parents=True, exist_ok=True)
    curves_figure(out / "curves.png", results)
    features_figure(out / "features.png", results)
    for r in results:
        r.pop("features")
    report = {"protocol": "cpu", "wall_seconds": time.perf_counter() - start, "results": results,
              "table": table(results)}
    atomic_write_text(out / "cpu_protocol.json", json.dumps(report, indent=2) + "\n")
    print(report["table"])
    return report
