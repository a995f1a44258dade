"""Compare test.py result folders side by side: box plots of Dice and surface distances per structure.

    python -m utils.compare RESULT_DIR [RESULT_DIR ...] -o fig.png [--names baseline learnt]
                            [--sample mean|identity|samples] [--metrics dice asd_mm hd95_mm]

Each RESULT_DIR is a folder written by test.py (it holds ``metrics.csv``). ``--sample`` picks the transformation
whose metrics are shown: ``mean`` the posterior mean (default), ``identity`` before registration, ``samples`` every
sample of q_v pooled. The command also prints, per folder, the mean Dice after registration and how the
uncertainty relates to error (from ``summary.json``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from utils.figures import METRIC_TITLES, comparison_boxplots
from utils.io import PathLike

SAMPLE_KINDS = ("mean", "identity", "samples")
KIND_TITLES = {"mean": "posterior mean", "identity": "before registration", "samples": "all samples of q_v"}


def _number(text: str) -> float:
    """A CSV cell as float; empty cells are NaN."""
    return float(text) if text.strip() else math.nan


def read_metrics(folder: PathLike) -> list[dict]:
    """Rows of ``<folder>/metrics.csv`` with the metric columns as floats."""
    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.csv in result folder {folder}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"structure", "sample", *METRIC_TITLES} <= set(rows[0]):
        raise ValueError(f"{path}: not a metrics table of test.py (expected columns structure, sample, "
                         f"{', '.join(METRIC_TITLES)})")
    for row in rows:
        for key in METRIC_TITLES:
            row[key] = _number(row[key])
    return rows


def by_structure(rows: Sequence[dict], sample: str = "mean",
                 metrics: Sequence[str] = tuple(METRIC_TITLES)) -> dict[str, dict[str, list[float]]]:
    """structure -> metric -> values of the rows of one transformation kind (see ``SAMPLE_KINDS``)."""
    if sample not in SAMPLE_KINDS:
        raise ValueError(f"sample must be one of {SAMPLE_KINDS}, got {sample!r}")
    grouped: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        kind = row["sample"] if row["sample"] in ("mean", "identity") else "samples"
        if kind != sample or not row["structure"]:
            continue
        entry = grouped.setdefault(row["structure"], {metric: [] for metric in metrics})
        for metric in metrics:
            entry[metric].append(row[metric])
    return grouped


def compare(folders: Sequence[PathLike], output: PathLike, names: Sequence[str] | None = None,
            sample: str = "mean", metrics: Sequence[str] = ("dice", "asd_mm")) -> Path:
    """Write the comparison figure of ``folders`` (named ``names``, default the folder names) to ``output``."""
    names = list(names) if names else [Path(folder).name for folder in folders]
    if len(names) != len(folders):
        raise ValueError(f"{len(folders)} result folders but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    unknown = sorted(set(metrics) - set(METRIC_TITLES))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: expected some of {list(METRIC_TITLES)}")
    results = {name: by_structure(read_metrics(folder), sample, metrics) for name, folder in zip(names, folders)}
    return comparison_boxplots(output, results, metrics, title=KIND_TITLES[sample])


UNCERTAINTY_COLUMNS = {"mean_uncertainty_structures": "std in structures mm",
                       "mean_uncertainty_background": "std elsewhere mm",
                       "uncertainty_disagreement_auc": "AUC std vs error"}


def uncertainty_table(folders: Sequence[PathLike], names: Sequence[str]) -> str:
    """Mean Dice after registration and the uncertainty-vs-error means of each folder's summary.json (n/a if none)."""
    header = f"{'result':<20}{'Dice after':>12}" + "".join(f"{title:>22}" for title in UNCERTAINTY_COLUMNS.values())
    lines = [header]
    for name, folder in zip(names, folders):
        path = Path(folder) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        means = summary.get("uncertainty", {}).get("mean", {})
        values = [summary.get("mean_dice_after")] + [means.get(key) for key in UNCERTAINTY_COLUMNS]
        cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"{name:<20}{cells[0]:>12}" + "".join(f"{cell:>22}" for cell in cells[1:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="RESULT_DIR", help="test.py result folders")
    parser.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--names", nargs="+", help="one name per folder (default: the folder names)")
    parser.add_argument("--sample", choices=SAMPLE_KINDS, default="mean",
                        help="transformation to show: posterior mean (default), identity, or all samples")
    parser.add_argument("--metrics", nargs="+", choices=tuple(METRIC_TITLES), default=["dice", "asd_mm"],
                        help="one panel per metric (default: dice asd_mm)")
    args = parser.parse_args(argv)
    path = compare(args.folders, args.output, args.names, args.sample, args.metrics)
    print(uncertainty_table(args.folders, args.names or [folder.name for folder in args.folders]))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
