"""The paper-budget protocol: does the learnt metric beat its baseline, and a retuned baseline, at the paper's budget?

    python -m benchmarks.paper_budget [--metrics SSD LCC] [--out benchmarks/results/paper_budget]
    python -m benchmarks.paper_budget --objective alignment_ranking [--set-train KEY=VALUE ...] \
        --baselines benchmarks/results/paper_budget --out benchmarks/results/paper_budget_alignment_ranking

The paper trained theta for about 600 steps at lr 1e-5 and q_f at lr 1e-3 (5 epochs of 120 steps; METHOD.md): a
budget, lr x steps (the most Adam moves one weight), of 6e-3 for theta and 0.6 for q_f. The protocol
(``configs/synthbrain/paper_budget/``, 32^3) trains with 40 steps at theta lr 1.5e-4 and q_f lr 1.5e-2 per 1x budget,
so both budgets and their ratio are the paper's, and keeps theta at 1/8, 1/4, 1/2, 1, 2 and 4 times the budget
(``trainer.keep_checkpoints``). Two folds of the nine SynthBrain dev pairs (train on sub-02..06 and test on
sub-07..10, then train on sub-06..10 and test on sub-02..05) give eight held-out pairs.

Every registration is tested as the reference tested: from the initial q_v, 1024 (SSD) or 1344 (LCC) q_v
iterations at the configs' q_v lr (0.01 / 0.02), and for SSD also at the paper's stated 0.1; posterior mean and 5
samples. The controls:

- the baseline at the reference's w_reg, which is also theta frozen (the Dirac-initialised f is the identity);
- the baseline with w_reg retuned: a sweep of w_reg over all nine pairs, chosen per fold on that fold's training
  pairs only (mean Dice of the posterior mean), reported on its held-out pairs;
- the baseline with w_reg matched to the learnt metric's pull: w_reg x (data-term gradient norm of the baseline /
  of the learnt metric at the identity, on the fold's training pairs; ``benchmarks.theta_analysis``). Registered
  at the 1x budget; at the other budgets read off the sweep per pair, linearly in log w_reg between the two
  nearest swept values (``interpolated`` in the result);
- a training run with theta and q_f frozen (fold a), for the training-pair learning curves.

Each run is recorded in ``<out>/runs.json`` as soon as it finishes, with its wall and CPU time; started again, the
command reuses finished runs and resumes an interrupted training run from its last checkpoint, so a killed protocol
loses at most the registration that was running. ``<out>/paper_budget.json`` holds every number, ``budget.png``
held-out Dice and folding against the theta budget, ``curves.png`` the training-pair curves.

``--objective`` trains theta with another ``theta_loss`` (model/alignment.py) under the same folds, budgets, test
schedule and controls, in training runs named ``<name>_<objective>``; ``--set-train`` overrides more keys of the
training config (e.g. ``theta_loss.args.spacing=2``). ``--baselines OUT`` reuses the finished runs of another output
folder that do not depend on theta (the w_reg sweeps and the theta-frozen control runs), and the report then sets
what theta learnt beside what it learnt there (``theta_side_by_side`` and ``features.png``: on fold a's training
pairs, at the Dirac initialisation and at each budget, with the preference for the frozen control's alignment).
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import os
import platform
import resource
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

import test as test_script
import train as train_script
from benchmarks.cpu_protocol import curves, curves_figure, feature_slices, features_figure
from benchmarks.theta_analysis import analyse
from trainer.base import KEPT
from trainer.run_folder import read_status
from utils.config import ThetaLoss, load_config
from utils.io import atomic_write, atomic_write_text

PROTOCOL = Path("configs/synthbrain/paper_budget")
FOLDS = ("a", "b")
PAPER_THETA_BUDGET = 600 * 1e-5  # ~600 theta steps (5 epochs x 120) at lr 1e-5
PAPER_Q_F_BUDGET = 600 * 1e-3
BUDGETS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the paper's theta budget kept by one training run
W_REG_REFERENCE = {"SSD": 1.8, "LCC": 2.8}  # the reference's SVF values (METHOD.md), those of the protocol's configs
# factors of 4 around the reference's values, reaching down to the weaker regularisation a learnt metric's larger
# pull amounts to (benchmarks.theta_analysis)
W_REG_SWEEP = {"SSD": (1.8, 0.45, 0.1125, 0.028125, 0.00703125), "LCC": (11.2, 2.8, 0.7, 0.175)}
Q_V_LRS = {"SSD": (0.01, 0.1), "LCC": (0.02,)}  # the configs' q_v lr first; 0.1 is the paper's stated SSD lr
PAPER = {  # the paper's test results (METHOD.md): learnt - baseline, Dice points and ASD mm; folding % of voxels
    "SSD": {"dice_points": 4.1, "asd_mm": -0.1, "folding_percent_learnt": 0.10, "folding_percent_baseline": 0.0},
    "LCC": {"dice_points": 0.6, "asd_mm": -0.01, "structures_significant": "11 of 15"}}
ALPHA, POWER = 0.05, 0.8
CONTRASTIVE = {"type": "contrastive", "args": {}}  # the theta_loss block of the paper's objective, as parsed
THETA_OBJECTIVES = typing.get_args(typing.get_type_hints(ThetaLoss)["type"])


def read_pairs(path: Path) -> list[str]:
    """Pair ids ``<fixed>_<moving>`` of a ``fixed,moving`` CSV."""
    with open(path, newline="") as handle:
        return [f"{row[0].strip()}_{row[1].strip()}" for row in csv.reader(handle) if row]


def budget_epochs(theta_lr: float, budgets=BUDGETS) -> dict[float, int]:
    """Epoch (= theta step: one batch per epoch) at which each budget multiple is reached with ``theta_lr``."""
    steps = PAPER_THETA_BUDGET / theta_lr
    epochs = {b: b * steps for b in budgets}
    if any(abs(e - round(e)) > 1e-6 or round(e) < 1 for e in epochs.values()):
        raise ValueError(f"theta lr {theta_lr} does not reach the budgets {budgets} at whole steps: {epochs}")
    return {b: int(round(e)) for b, e in epochs.items()}


# ---------------------------------------------------------------------------------------------------------------
# reading a test run
# ---------------------------------------------------------------------------------------------------------------

def per_pair(folder: Path) -> dict[str, dict]:
    """Per pair of a test run's metrics.csv: mean over structures of Dice and ASD of the posterior mean
    (``dice``, ``asd_mm``) and of each sample, then over samples (``dice_samples``, ``asd_mm_samples``); % of
    voxels with det J < 0 over the volume (the reference's count) of the mean and over the samples
    (``folding_percent``, ``folding_percent_samples``); Dice before registration (``dice_before``); and per
    structure the Dice of every sample (``sample_dice``: {structure: [...]}) for the paper's Welch test.

    A structure that the warping lost (``missing_in_warped``) counts with Dice 0 and no ASD; one missing from the
    fixed segmentation does not count."""
    rows: dict[str, dict] = {}
    with open(folder / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            pair = rows.setdefault(row["pair_id"], {"samples": {}})
            if row["sample"] in ("identity", "mean"):
                target = pair.setdefault(row["sample"], {})
            else:
                target = pair["samples"].setdefault(row["sample"], {})
            target.setdefault("folding", float(row["folding_percent_reference"]))
            if row["status"] in ("ok", "missing_in_warped"):
                target.setdefault("structures", {})[row["structure"]] = (float(row["dice"]), float(row["asd_mm"]))

    def averages(entry: dict) -> tuple[float, float]:
        values = np.array(list(entry.get("structures", {}).values()), dtype=float).reshape(-1, 2)
        asd = values[:, 1][np.isfinite(values[:, 1])]
        return float(values[:, 0].mean()), float(asd.mean()) if asd.size else math.nan

    result = {}
    for pid, pair in rows.items():
        samples = list(pair["samples"].values())
        sample_dice: dict[str, list[float]] = {}
        for s in samples:
            for name, (dice, _) in s.get("structures", {}).items():
                sample_dice.setdefault(name, []).append(dice)
        per_sample = [averages(s) for s in samples]
        result[pid] = {"dice": averages(pair["mean"])[0], "asd_mm": averages(pair["mean"])[1],
                       "folding_percent": pair["mean"]["folding"], "dice_before": averages(pair["identity"])[0],
                       "dice_samples": float(np.mean([d for d, _ in per_sample])) if samples else math.nan,
                       "asd_mm_samples": float(np.nanmean([a for _, a in per_sample])) if samples else math.nan,
                       "folding_percent_samples": (float(np.mean([s["folding"] for s in samples]))
                                                   if samples else math.nan),
                       "sample_dice": sample_dice}
    return result


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

QUANTITIES = ("dice", "asd_mm", "folding_percent", "dice_samples", "asd_mm_samples", "folding_percent_samples",
              "dice_before")


def paired(reference: dict, other: dict, pairs: list[str]) -> dict:
    """Per-pair ``other - reference`` of each quantity, its mean, and the two-sided Wilcoxon signed-rank p over the
    pairs (None when every difference is 0). With n pairs the smallest attainable p is 2 / 2^n."""
    pairs = [p for p in pairs if p in reference and p in other]
    result: dict = {"n": len(pairs), "smallest_attainable_p": 2.0 / 2 ** len(pairs) if pairs else None}
    for key in QUANTITIES:
        diffs = np.array([other[p][key] - reference[p][key] for p in pairs], dtype=float)
        finite = diffs[np.isfinite(diffs)]
        test = stats.wilcoxon(finite) if finite.size and np.any(finite != 0) else None
        result[key] = {"mean_difference": float(finite.mean()) if finite.size else None,
                       "sd_difference": float(finite.std(ddof=1)) if finite.size > 1 else None,
                       "wilcoxon_p": None if test is None else float(test.pvalue)}
    return result


def welch_over_samples(reference: dict, other: dict, pairs: list[str]) -> dict:
    """The paper's test: per structure, a one-tailed Welch t-test that ``other``'s sample Dice values (all pairs x
    samples pooled) exceed ``reference``'s. Samples of one pair are not independent, so these p-values are smaller
    than the evidence warrants; reported because the paper reported them."""
    structures = sorted({s for p in pairs if p in reference for s in reference[p]["sample_dice"]})
    result = {}
    for name in structures:
        a = [d for p in pairs if p in other for d in other[p]["sample_dice"].get(name, [])]
        b = [d for p in pairs if p in reference for d in reference[p]["sample_dice"].get(name, [])]
        if len(a) > 1 and len(b) > 1:
            test = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
            result[name] = {"mean_difference": float(np.mean(a) - np.mean(b)), "p": float(test.pvalue)}
    result_summary = {"structures": result,
                      "significant": sum(r["p"] < ALPHA for r in result.values()), "of": len(result)}
    return result_summary


def pairs_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Smallest n for a two-sided paired t-test at ``alpha`` to detect a mean difference ``effect`` with per-pair
    sd ``sd`` at ``power`` (noncentral t). For the Wilcoxon signed-rank test divide by its asymptotic relative
    efficiency, 3/pi for normal differences."""
    if not sd or not math.isfinite(sd) or sd <= 0:
        return None
    for n in range(2, 100000):
        df = n - 1
        critical = stats.t.ppf(1 - alpha / 2, df)
        shift = effect / sd * math.sqrt(n)
        achieved = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
        if achieved >= power:
            return n
    return None


def choose_w_reg(sweep: dict[float, dict], pairs: list[str]) -> float:
    """The swept w_reg with the best mean posterior-mean Dice over ``pairs`` (a fold's training pairs)."""
    return max(sweep, key=lambda w: np.mean([sweep[w][p]["dice"] for p in pairs]))


def interpolate_sweep(sweep: dict[float, dict], w_reg: float, pairs: list[str]) -> tuple[dict, bool]:
    """Per pair, each quantity at ``w_reg`` read off the sweep: linear in log w_reg between the two nearest swept
    values; outside the swept range, the nearest end (the bool says so)."""
    swept = sorted(sweep)
    outside = not swept[0] <= w_reg <= swept[-1]
    clamped = min(max(w_reg, swept[0]), swept[-1])
    upper = next(w for w in swept if w >= clamped)
    lower = max(w for w in swept if w <= clamped)
    t = 0.0 if upper == lower else (math.log(clamped) - math.log(lower)) / (math.log(upper) - math.log(lower))
    result = {p: {key: (1 - t) * sweep[lower][p][key] + t * sweep[upper][p][key] for key in QUANTITIES}
              for p in pairs}
    return result, outside


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Ledger:
    """``runs.json``: what each finished run of the protocol was, and what it cost; written after every run."""

    path: Path

    def __post_init__(self) -> None:
        self.runs: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self._mine: set[str] = set()

    def _save(self) -> None:
        """Write this ledger's runs into the file, keeping those that another process (``--metrics LCC`` beside
        ``--metrics SSD``) wrote meanwhile: read, merge and replace under an exclusive lock."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            self.runs = {**self.runs, **on_disk, **{key: self.runs[key] for key in self._mine}}
            atomic_write_text(self.path, json.dumps(self.runs, indent=2) + "\n")

    def run(self, key: str, start: Callable[[], Path], finished: Callable[[Path], Path]) -> Path:
        """The folder of run ``key``: recorded, or made by ``start`` (timed; ``finished`` maps its return value to
        the run folder)."""
        entry = self.runs.get(key)
        if entry is not None and entry.get("folder") and (read_status(Path(entry["folder"])) or {}).get(
                "status") == "finished":
            return Path(entry["folder"])
        self.runs[key] = {"started": time.time()}
        self._mine.add(key)
        self._save()
        wall, cpu = time.perf_counter(), _cpu_seconds()
        folder = finished(start())
        self.runs[key] = {"folder": os.path.relpath(folder), "wall_seconds": time.perf_counter() - wall,
                          "cpu_seconds": _cpu_seconds() - cpu, "date": time.strftime("%Y-%m-%d %H:%M"),
                          "load_after": list(os.getloadavg())}
        self._save()
        print(f"[paper_budget] {key}: {self.runs[key]['wall_seconds'] / 60:.1f} min", flush=True)
        return folder

    def reuse(self, other: "Ledger", prefixes: tuple[str, ...]) -> None:
        """Take over ``other``'s finished runs whose keys start with one of ``prefixes`` (runs that do not depend on
        what this ledger's protocol changes), unless this ledger has them already."""
        taken = {key: entry for key, entry in other.runs.items() if key.startswith(prefixes) and "folder" in entry
                 and "folder" not in self.runs.get(key, {})
                 and (read_status(Path(entry["folder"])) or {}).get("status") == "finished"}
        if taken:
            self.runs.update({key: {**entry, "reused_from": str(other.path)} for key, entry in taken.items()})
            self._mine.update(taken)
            self._save()

    def started(self, key: str) -> float | None:
        """When an unfinished run ``key`` was started (None if it never was or has finished)."""
        entry = self.runs.get(key, {})
        return None if "folder" in entry else entry.get("started")


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def interrupted_training(save_dir: Path, name: str, pairs: Path, since: float,
                         theta_loss: dict | None = None) -> Path | None:
    """The last checkpoint of an unfinished training run on ``pairs`` started after ``since`` (epoch seconds); with
    ``theta_loss``, of a run with that theta loss (a run folder of a version without the key: the contrastive)."""
    found = []
    for folder in (save_dir / name).glob("train-*"):
        config = folder / "config.json"
        if (not config.is_file() or folder.stat().st_mtime < since
                or (read_status(folder) or {}).get("status") == "finished"):
            continue
        stored = json.loads(config.read_text())
        if stored["data_loader"]["args"]["im_pairs"] != str(pairs.resolve()):
            continue
        if theta_loss is not None and stored.get("theta_loss", CONTRASTIVE) != theta_loss:
            continue
        found += list((folder / "checkpoints").glob("checkpoint_epoch*.pt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class Protocol:
    """The runs of the protocol for the metrics asked for, in order of priority, each recorded in the ledger."""

    def __init__(self, metrics: list[str], out: Path, root: Path = PROTOCOL, objective: str = "contrastive",
                 train_sets: list[str] = (), baselines: Path | None = None):
        self.metrics, self.out, self.root = metrics, out, root
        self.objective, self.baselines = objective, baselines
        self.ledger = Ledger(out / "runs.json")
        self.dev = Path(load_config(self.config("SSD", "test_baseline")).data_loader.args.im_pairs)
        self.train_sets = list(train_sets)
        if baselines is not None:
            self.ledger.reuse(Ledger(baselines / "runs.json"), ("sweep:", "train_frozen:"))

    def config(self, metric: str, kind: str) -> Path:
        return self.root / metric / f"config_{kind}_{metric}.json"

    def fold(self, fold: str, part: str) -> Path:
        return (self.root / f"fold_{fold}_{part}.csv").resolve()

    def training_sets(self, metric: str) -> list[str]:
        """The overrides of ``--objective`` and ``--set-train`` for ``metric``'s training config. The runs of another
        objective get their own name, so that their folders stay apart from the contrastive runs of the same pairs."""
        if self.objective == "contrastive":
            return list(self.train_sets)
        name = load_config(self.config(metric, "train")).name
        return [f'theta_loss={{"type": "{self.objective}", "args": {{}}}}', f"name={name}_{self.objective}",
                *self.train_sets]

    def epochs(self, metric: str) -> dict[float, int]:
        config = load_config(self.config(metric, "train"), self.training_sets(metric))
        epochs = budget_epochs(config.optimizer_q_phi.args.lr)
        missing = sorted(set(epochs.values()) - set(config.trainer.keep_checkpoints))
        if missing or config.trainer.no_epochs < max(epochs.values()):
            raise ValueError(f"{self.config(metric, 'train')}: trainer.keep_checkpoints must hold the budget epochs "
                             f"{sorted(epochs.values())} and no_epochs reach them")
        return epochs

    def train(self, metric: str, fold: str, frozen: bool = False) -> Path:
        """The training run folder of ``metric`` on ``fold``'s training pairs (theta frozen: the control run)."""
        key = f"train{'_frozen' if frozen else ''}:{metric}:{fold}"
        pairs = self.fold(fold, "train")
        sets = [*self.training_sets(metric), f"data_loader.args.im_pairs={pairs}"] + (
            ["trainer.freeze_theta=true"] if frozen else [])
        config = load_config(self.config(metric, "train"), sets)
        since = self.ledger.started(key)
        partial = None if since is None else interrupted_training(config.trainer.save_dir, config.name, pairs, since,
                                                                  config.to_dict()["theta_loss"])

        def start() -> Path:
            if partial is not None:
                return train_script.main(["-r", str(partial)])
            return train_script.main(["-c", str(self.config(metric, "train")), *_sets(sets)])

        return self.ledger.run(key, start, lambda checkpoint: checkpoint.parent.parent)

    def register(self, key: str, metric: str, pairs: Path | None, q_v_lr: float, w_reg: float | None = None,
                 checkpoint: Path | None = None) -> Path:
        kind = "test_baseline" if checkpoint is None else "test_learnt"
        sets = [f"optimizer_q_v.args.lr={q_v_lr}"]
        sets += [] if pairs is None else [f"data_loader.args.im_pairs={pairs}"]
        sets += [] if w_reg is None else [f"reg_loss.args.w_reg={w_reg}"]
        resume = [] if checkpoint is None else ["-r", str(checkpoint)]
        return self.ledger.run(key, lambda: test_script.main(["-c", str(self.config(metric, kind)), *resume,
                                                              *_sets(sets)]), lambda folder: folder)

    def sweep(self, metric: str, q_v_lr: float) -> dict[float, Path]:
        """The baseline at every swept w_reg, on all nine dev pairs."""
        return {w: self.register(f"sweep:{metric}:lr{q_v_lr}:w{w}", metric, None, q_v_lr, w_reg=w)
                for w in W_REG_SWEEP[metric]}

    def kept(self, run: Path, epoch: int) -> Path:
        return run / KEPT / f"checkpoint_epoch{epoch}.pt"

    def learnt(self, metric: str, fold: str, budget: float, q_v_lr: float) -> Path:
        run = self.train(metric, fold)
        return self.register(f"learnt:{metric}:lr{q_v_lr}:{fold}:x{budget}", metric, self.fold(fold, "held_out"),
                             q_v_lr, checkpoint=self.kept(run, self.epochs(metric)[budget]))

    def pulls(self, metric: str, fold: str) -> dict:
        """theta_analysis numbers (no q_v motion) at the Dirac initialisation and at every kept checkpoint, on the
        fold's five training pairs; cached in ``<out>/theta_<metric>_<fold>.json``."""
        path = self.out / f"theta_{metric}_{fold}.json"
        if path.is_file():
            return json.loads(path.read_text())
        run, epochs = self.train(metric, fold), self.epochs(metric)
        described = analyse(run / "config.json", self.fold(fold, "train"),
                            [None, *[self.kept(run, epochs[b]) for b in BUDGETS]], no_pairs=5)
        result = {"budgets": [0.0, *BUDGETS], "steps": [0, *[epochs[b] for b in BUDGETS]], "describe": described}
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        return result

    def matched_w_reg(self, metric: str, fold: str) -> dict[float, float]:
        """Per budget: the reference w_reg x baseline pull / learnt pull."""
        described = self.pulls(metric, fold)["describe"]
        base = described[0]["data_gradient_norm"]
        return {b: W_REG_REFERENCE[metric] * base / d["data_gradient_norm"] for b, d in zip(BUDGETS, described[1:])}

    def matched(self, metric: str, fold: str, budget: float, q_v_lr: float) -> Path:
        w_reg = self.matched_w_reg(metric, fold)[budget]
        return self.register(f"matched:{metric}:lr{q_v_lr}:{fold}:x{budget}", metric, self.fold(fold, "held_out"),
                             q_v_lr, w_reg=w_reg)

    def run_all(self) -> None:
        """Every run, most important first: training; the baselines; the 1x budget with its matched control; the
        other budgets, out from 1x; SSD at the paper's stated q_v lr; last the frozen-theta control runs (whether a
        training-pair learning curve is theta's doing; on held-out pairs, theta frozen is the baseline at the
        reference w_reg)."""
        for metric in self.metrics:
            self.epochs(metric)  # a config that cannot give the budgets fails before anything runs
            if W_REG_REFERENCE[metric] not in W_REG_SWEEP[metric]:
                raise ValueError(f"the w_reg sweep of {metric} must hold the reference's {W_REG_REFERENCE[metric]}")
        for metric in self.metrics:
            for fold in FOLDS:
                self.train(metric, fold)
        for metric in self.metrics:
            self.sweep(metric, Q_V_LRS[metric][0])
        for metric in self.metrics:
            for fold in FOLDS:
                self.learnt(metric, fold, 1.0, Q_V_LRS[metric][0])
                self.matched(metric, fold, 1.0, Q_V_LRS[metric][0])
        for metric in self.metrics:
            for budget in sorted(BUDGETS, key=lambda b: abs(math.log2(b))):  # out from 1x: the neighbours first
                for fold in FOLDS:
                    self.learnt(metric, fold, budget, Q_V_LRS[metric][0])
        for metric in self.metrics:
            for q_v_lr in Q_V_LRS[metric][1:]:
                self.sweep(metric, q_v_lr)
                for fold in FOLDS:
                    self.learnt(metric, fold, 1.0, q_v_lr)
                    self.matched(metric, fold, 1.0, q_v_lr)
        for metric in self.metrics:
            self.train(metric, "a", frozen=True)

    # -----------------------------------------------------------------------------------------------------------
    # analysis
    # -----------------------------------------------------------------------------------------------------------

    def analyse_metric(self, metric: str, q_v_lr: float) -> dict:
        """Held-out comparison of the learnt metric at each budget against the three controls."""
        folds = {f: (read_pairs(self.fold(f, "train")), read_pairs(self.fold(f, "held_out"))) for f in FOLDS}
        held_out = [p for f in FOLDS for p in folds[f][1]]
        sweep = {w: per_pair(self.sweep(metric, q_v_lr)[w]) for w in W_REG_SWEEP[metric]}
        reference_w = W_REG_REFERENCE[metric]
        baseline = {p: sweep[reference_w][p] for p in held_out}
        chosen = {f: choose_w_reg(sweep, folds[f][0]) for f in FOLDS}
        retuned = {p: sweep[chosen[f]][p] for f in FOLDS for p in folds[f][1]}
        result: dict = {"metric": metric, "q_v_lr": q_v_lr, "held_out_pairs": held_out,
                        "w_reg_reference": reference_w, "w_reg_retuned": chosen,
                        "sweep_held_out": {str(w): {k: float(np.mean([sweep[w][p][k] for p in held_out]))
                                                    for k in QUANTITIES} for w in sweep},
                        "sweep_training_choice": {f: {str(w): float(np.mean([sweep[w][p]["dice"] for p in folds[f][0]]))
                                                      for w in sweep} for f in FOLDS},
                        "baseline": _means(baseline, held_out), "retuned": _means(retuned, held_out),
                        "budgets": {}}
        for budget in BUDGETS:
            key = f"learnt:{metric}:lr{q_v_lr}:{{}}:x{budget}"
            if not all(self._done(key.format(f)) for f in FOLDS):
                continue
            learnt = {p: v for f in FOLDS for p, v in per_pair(self.ledger_folder(key.format(f))).items()}
            matched, how = {}, {}
            for f in FOLDS:
                w = self.matched_w_reg(metric, f)[budget]
                exact = f"matched:{metric}:lr{q_v_lr}:{f}:x{budget}"
                if self._done(exact):
                    matched.update(per_pair(self.ledger_folder(exact)))
                    how[f] = {"w_reg": w, "how": "registered"}
                else:
                    values, outside = interpolate_sweep(sweep, w, folds[f][1])
                    matched.update(values)
                    how[f] = {"w_reg": w, "how": "extrapolated (nearest swept)" if outside else "interpolated"}
            result["budgets"][str(budget)] = {
                "learnt": _means(learnt, held_out), "matched": {**_means(matched, held_out), "w_reg": how},
                "per_pair": {p: {k: learnt[p][k] for k in QUANTITIES} for p in held_out if p in learnt},
                "vs_baseline": paired(baseline, learnt, held_out),
                "vs_retuned": paired(retuned, learnt, held_out),
                "vs_matched": paired(matched, learnt, held_out),
                "welch_vs_baseline": welch_over_samples(baseline, learnt, held_out)}
        one = result["budgets"].get("1.0")
        if one is not None:
            sd = one["vs_baseline"]["dice"]["sd_difference"]
            result["pairs_needed"] = {f"{points} points": {"paired_t": pairs_needed(points / 100, sd),
                                                           "wilcoxon": _wilcoxon_n(pairs_needed(points / 100, sd))}
                                      for points in (4.1, 0.6)}
            result["pairs_needed"]["sd_difference_at_1x"] = sd
        result["baseline_per_pair"] = {p: {k: baseline[p][k] for k in QUANTITIES} for p in held_out}
        result["retuned_per_pair"] = {p: {k: retuned[p][k] for k in QUANTITIES} for p in held_out}
        return result

    def theta_side_by_side(self, metric: str) -> dict | None:
        """``benchmarks.theta_analysis`` numbers of fold a's training run with this protocol's objective beside those
        of ``--baselines``' run, on fold a's five training pairs, at the Dirac initialisation and at every budget,
        with the preference for the alignment of the frozen control run; None until all three runs are done. Cached
        in ``<out>/theta_side_by_side_<metric>.json``."""
        key, frozen = f"train:{metric}:a", f"train_frozen:{metric}:a"
        other = None if self.baselines is None else Ledger(self.baselines / "runs.json")
        if other is None or not (self._done(key) and self._done(frozen) and "folder" in other.runs.get(key, {})):
            return None
        path = self.out / f"theta_side_by_side_{metric}.json"
        if path.is_file():
            return json.loads(path.read_text())
        pairs, aligned = self.fold("a", "train"), self.ledger_folder(frozen)
        result = {"budgets": [0.0, *BUDGETS], "aligned_run": str(aligned), "objectives": {}}
        for run in (Path(other.runs[key]["folder"]), self.ledger_folder(key)):
            config = load_config(run / "config.json")
            epochs = budget_epochs(config.optimizer_q_phi.args.lr, BUDGETS)
            checkpoints = [None, *[self.kept(run, epochs[b]) for b in BUDGETS]]
            label = config.theta_loss.type  # with --set-train, both runs may have the same objective
            label = label if label not in result["objectives"] else f"{label}, {run.name}"
            result["objectives"][label] = {
                "run": str(run), "steps": [0, *[epochs[b] for b in BUDGETS]],
                "describe": analyse(run / "config.json", pairs, checkpoints, no_pairs=5, aligned_run=aligned)}
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        return result

    def features(self, metric: str, side_by_side: dict) -> list[dict]:
        """f(F) mid-slices of each objective's fold-a run at steps 0, 1x and 4x the budget, for ``features.png``."""
        rows = []
        for objective, entry in side_by_side["objectives"].items():
            run = Path(entry["run"])
            steps = dict(zip(side_by_side["budgets"], entry["steps"]))
            shown = [0, steps[1.0], steps[4.0]]
            checkpoints = [None, *[self.kept(run, step) for step in shown[1:]]]
            rows.append({"metric": f"{metric} {objective}", "feature_steps": shown,
                         "features": feature_slices(run / "config.json", self.fold("a", "train"), checkpoints)})
        return rows

    def _done(self, key: str) -> bool:
        return "folder" in self.ledger.runs.get(key, {})

    def ledger_folder(self, key: str) -> Path:
        return Path(self.ledger.runs[key]["folder"])

    def report(self) -> dict:
        results = [self.analyse_metric(m, lr) for m in self.metrics for lr in Q_V_LRS[m]
                   if all(self._done(f"sweep:{m}:lr{lr}:w{w}") for w in W_REG_SWEEP[m])]
        theta = {f"{m}:{f}": self.pulls(m, f) for m in self.metrics for f in FOLDS if self._done(f"train:{m}:{f}")}
        training_curves = []
        for m in self.metrics:
            if self._done(f"train:{m}:a"):
                entry = {"metric": m, "curves": curves(self.ledger_folder(f"train:{m}:a"))}
                if self._done(f"train_frozen:{m}:a"):
                    entry["curves_frozen"] = curves(self.ledger_folder(f"train_frozen:{m}:a"))
                training_curves.append(entry)
        side_by_side = {m: found for m in self.metrics if (found := self.theta_side_by_side(m)) is not None}
        report = {"protocol": "paper_budget", "paper": PAPER, "budgets": BUDGETS, "objective": self.objective,
                  "steps": {m: self.epochs(m) for m in self.metrics},
                  "results": results, "theta": theta, "runs": self.ledger.runs,
                  "table": table(results) + ("\n\n" + theta_table(side_by_side) if side_by_side else ""),
                  "machine": {"platform": platform.platform(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
        if side_by_side:
            report["theta_side_by_side"] = side_by_side
        atomic_write_text(self.out / "paper_budget.json", json.dumps(report, indent=2, default=_json) + "\n")
        if results:
            budget_figure(self.out / "budget.png", results)
        if training_curves:
            curves_figure(self.out / "curves.png", training_curves)
        if side_by_side:
            features_figure(self.out / "features.png",
                            [row for m, found in side_by_side.items() for row in self.features(m, found)])
        return report


def _json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _wilcoxon_n(n_t: int | None) -> int | None:
    return None if n_t is None else math.ceil(n_t / (3 / math.pi))


def _means(values: dict, pairs: list[str]) -> dict:
    return {k: float(np.nanmean([values[p][k] for p in pairs if p in values])) for k in QUANTITIES}


def table(results: list[dict]) -> str:
    """Markdown: at the 1x budget, the paper's learnt - baseline beside ours against each control."""
    lines = ["| metric | q_v lr | Dice baseline | Dice retuned (w_reg) | Dice learnt 1x | learnt - baseline "
             "(points; Wilcoxon p) | learnt - retuned | learnt - matched | paper: learnt - baseline | "
             "folding % learnt / baseline (samples) | Welch structures p<0.05 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        one = r["budgets"].get("1.0")
        if one is None:
            continue
        d = {k: one[k]["dice"] for k in ("vs_baseline", "vs_retuned", "vs_matched")}
        cell = {k: f"{100 * v['mean_difference']:+.1f}; p {v['wilcoxon_p']:.3f}" if v["wilcoxon_p"] is not None
                else f"{100 * (v['mean_difference'] or 0):+.1f}; n/a" for k, v in d.items()}
        w = ", ".join(f"{f}: {v}" for f, v in r["w_reg_retuned"].items())
        welch = one["welch_vs_baseline"]
        lines.append(f"| {r['metric']} | {r['q_v_lr']} | {r['baseline']['dice']:.3f} | {r['retuned']['dice']:.3f} "
                     f"({w}) | {one['learnt']['dice']:.3f} | {cell['vs_baseline']} | {cell['vs_retuned']} | "
                     f"{cell['vs_matched']} | {PAPER[r['metric']]['dice_points']:+.1f} | "
                     f"{one['learnt']['folding_percent_samples']:.3f} / {r['baseline']['folding_percent_samples']:.3f}"
                     f" | {welch['significant']} of {welch['of']} |")
    return "\n".join(lines)


THETA_COLUMNS = (("feature_gain", "gain", "{:.3g}"), ("feature_sharpness", "sharpness", "{:.2f}"),
                 ("data_gradient_norm", "pull", "{:.3g}"), ("data_gradient_smooth_fraction", "smooth fraction", "{:.2f}"),
                 ("alignment_preference", "preference", "{:+.3f}"))


def theta_table(side_by_side: dict[str, dict]) -> str:
    """Markdown: per metric, budget and objective, what theta learnt (``Protocol.theta_side_by_side``)."""
    lines = ["| metric | budget | theta step | objective | " + " | ".join(c[1] for c in THETA_COLUMNS) + " |",
             "| --- " * (4 + len(THETA_COLUMNS)) + "|"]
    for metric, found in side_by_side.items():
        for i, budget in enumerate(found["budgets"]):
            for objective, entry in found["objectives"].items():
                numbers = entry["describe"][i]
                cells = [form.format(numbers[key]) if key in numbers else "" for key, _, form in THETA_COLUMNS]
                lines.append(f"| {metric} | {budget:g}x | {entry['steps'][i]} | {objective} | {' | '.join(cells)} |")
    return "\n".join(lines)


def budget_figure(path: Path, results: list[dict]) -> None:
    """Held-out Dice and % folding (samples) against the theta budget: learnt (solid), baseline at the reference
    w_reg (dotted), retuned baseline (dash-dot), baseline at the matched w_reg (dashed)."""
    figure = Figure(figsize=(10, 3.8))
    for column, (key, label) in enumerate((("dice", "held-out Dice (posterior mean)"),
                                           ("folding_percent_samples", "% voxels det J < 0 (samples)"))):
        axes = figure.add_subplot(1, 2, column + 1)
        for colour, r in enumerate(results):
            budgets = [float(b) for b in r["budgets"]]
            name = f"{r['metric']} (q_v lr {r['q_v_lr']})"
            axes.plot(budgets, [r["budgets"][b]["learnt"][key] for b in r["budgets"]], "-o", color=f"C{colour}",
                      markersize=3, label=f"learnt {name}")
            axes.plot(budgets, [r["budgets"][b]["matched"][key] for b in r["budgets"]], "--", color=f"C{colour}",
                      label="baseline, matched w_reg")
            axes.axhline(r["baseline"][key], linestyle=":", color=f"C{colour}", label="baseline, reference w_reg")
            axes.axhline(r["retuned"][key], linestyle="-.", color=f"C{colour}", label="baseline, retuned w_reg")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("theta budget (x the paper's lr x steps)")
        axes.set_ylabel(label)
        if column == 0:
            axes.legend(fontsize=6)
    figure.suptitle("paper-budget protocol: eight held-out SynthBrain pairs (two folds), 32^3")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="+", default=["SSD", "LCC"], choices=["SSD", "LCC"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_budget"))
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs recorded so far, without starting any")
    parser.add_argument("--objective", default="contrastive", choices=THETA_OBJECTIVES,
                        help="theta_loss.type of the training runs (default: the paper's contrastive loss)")
    parser.add_argument("--set-train", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the training configs, e.g. theta_loss.args.spacing=2 (repeatable)")
    parser.add_argument("--baselines", type=Path,
                        help="an output folder of this protocol whose w_reg sweeps and theta-frozen control runs are "
                             "reused, and whose learnt theta is set beside this one's")
    args = parser.parse_args(argv)
    if args.baselines is not None and args.baselines.resolve() == args.out.resolve():
        parser.error("--baselines must be another output folder than --out")
    args.out.mkdir(parents=True, exist_ok=True)
    protocol = Protocol(args.metrics, args.out, objective=args.objective, train_sets=args.set_train,
                        baselines=args.baselines)
    if not args.report_only:
        protocol.run_all()
    report = protocol.report()
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
