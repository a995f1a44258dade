"""The paper-budget protocol: its budgets and splits, and the statistics it reports, against hand computations."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmarks.paper_budget import (BUDGETS, FOLDS, PROTOCOL, Ledger, Protocol, budget_epochs, choose_w_reg,
                                     interpolate_sweep, interrupted_training, paired, pairs_needed, per_pair,
                                     read_pairs, theta_table, welch_over_samples)
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
needs_synthbrain = pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "synthbrain").is_dir(),
                                      reason="../shared/data/synthbrain is absent (the configs name it)")
FIELDS = ("pair_id", "sample", "structure", "status", "dice", "asd_mm", "folding_percent_reference")


def write_metrics(folder: Path, rows: list[tuple]) -> Path:
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    return folder


def test_budgets_are_the_papers_lr_times_steps():
    """The paper: ~600 theta steps at lr 1e-5 (METHOD.md). At lr 1.5e-4, 40 steps are one budget."""
    assert budget_epochs(1.5e-4) == {0.125: 5, 0.25: 10, 0.5: 20, 1.0: 40, 2.0: 80, 4.0: 160}
    assert budget_epochs(1e-5)[1.0] == 600
    with pytest.raises(ValueError, match="whole steps"):
        budget_epochs(1e-4)  # 1/8 of 60 steps is 7.5


@pytest.mark.parametrize("metric", ["SSD", "LCC"])
def test_protocol_configs_keep_the_papers_budgets_ratio_and_test_schedule(metric):
    train = json.loads((ROOT / PROTOCOL / metric / f"config_train_{metric}.json").read_text())
    theta_lr, q_f_lr = train["optimizer_q_phi"]["args"]["lr"], train["optimizer_q_f"]["args"]["lr"]
    steps = 6e-3 / theta_lr  # one paper budget: 600 x 1e-5
    assert q_f_lr * steps == pytest.approx(0.6) and q_f_lr / theta_lr == pytest.approx(1e-3 / 1e-5)
    assert sorted(train["trainer"]["keep_checkpoints"]) == [round(b * steps) for b in BUDGETS]
    assert train["trainer"]["no_epochs"] == round(max(BUDGETS) * steps)
    assert train["data_loader"]["args"]["batch_size"] == 5  # one theta step per epoch on a fold's five pairs
    lr, iterations = {"SSD": (0.01, 1024), "LCC": (0.02, 1344)}[metric]  # the reference's test schedule
    for kind in ("baseline", "learnt"):
        test = json.loads((ROOT / PROTOCOL / metric / f"config_test_{kind}_{metric}.json").read_text())
        assert (test["optimizer_q_v"]["args"]["lr"], test["trainer"]["no_iters_q_v"]) == (lr, iterations)
        assert test["trainer"]["no_samples_test"] == 5
        assert test["reg_loss"]["args"]["w_reg"] == {"SSD": 1.8, "LCC": 2.8}[metric]


def test_the_two_folds_hold_out_eight_dev_pairs_and_never_train_on_them():
    folds = {f: (read_pairs(ROOT / PROTOCOL / f"fold_{f}_train.csv"),
                 read_pairs(ROOT / PROTOCOL / f"fold_{f}_held_out.csv")) for f in FOLDS}
    for train, held_out in folds.values():
        assert len(train) == 5 and len(held_out) == 4 and not set(train) & set(held_out)
    held_out = folds["a"][1] + folds["b"][1]
    assert len(set(held_out)) == 8
    dev = ROOT.parent / "shared" / "data" / "synthbrain" / "pairs_dev.csv"
    if not dev.is_file():
        pytest.skip(f"SynthBrain data not found at {dev.parent}")
    assert set(folds["a"][0] + folds["a"][1]) == set(folds["b"][0] + folds["b"][1]) == set(read_pairs(dev))


def test_per_pair_averages_structures_then_samples_and_counts_a_lost_structure_as_zero(tmp_path):
    rows = [("p", "identity", "a", "ok", 0.2, 3.0, 0.0), ("p", "identity", "b", "ok", 0.4, 5.0, 0.0),
            ("p", "mean", "a", "ok", 0.6, 1.0, 0.5), ("p", "mean", "b", "missing_in_warped", 0.0, "nan", 0.5),
            ("p", "mean", "c", "missing_in_fixed", "nan", "nan", 0.5),
            ("p", "0", "a", "ok", 0.8, 2.0, 1.0), ("p", "0", "b", "ok", 0.4, 4.0, 1.0),
            ("p", "1", "a", "ok", 0.6, 1.0, 3.0), ("p", "1", "b", "ok", 0.2, 3.0, 3.0)]
    found = per_pair(write_metrics(tmp_path, rows))["p"]
    assert found["dice"] == pytest.approx(0.3) and found["asd_mm"] == pytest.approx(1.0)
    assert found["dice_before"] == pytest.approx(0.3)
    assert found["dice_samples"] == pytest.approx((0.6 + 0.4) / 2)
    assert found["asd_mm_samples"] == pytest.approx((3.0 + 2.0) / 2)
    assert found["folding_percent"] == 0.5 and found["folding_percent_samples"] == pytest.approx(2.0)
    assert found["sample_dice"] == {"a": [0.8, 0.6], "b": [0.4, 0.2]}


def _pairs(values: dict[str, float]) -> dict:
    return {p: {"dice": v, "asd_mm": -v, "folding_percent": 0.0, "dice_samples": v, "asd_mm_samples": 0.0,
                "folding_percent_samples": 0.0, "dice_before": 0.5} for p, v in values.items()}


def test_paired_differences_and_the_exact_wilcoxon_p_of_eight_improvements():
    pairs = [f"p{i}" for i in range(8)]
    reference = _pairs({p: 0.5 for p in pairs})
    other = _pairs({p: 0.5 + 0.01 * (i + 1) for i, p in enumerate(pairs)})
    result = paired(reference, other, pairs + ["unregistered"])
    assert result["n"] == 8 and result["smallest_attainable_p"] == pytest.approx(2 / 256)
    assert result["dice"]["mean_difference"] == pytest.approx(0.045)
    assert result["dice"]["sd_difference"] == pytest.approx(np.std(0.01 * np.arange(1, 9), ddof=1))
    assert result["dice"]["wilcoxon_p"] == pytest.approx(2 / 256)  # all eight of one sign: 2 x (1/2)^8
    assert result["dice_before"]["wilcoxon_p"] is None  # no difference at all


def test_welch_over_samples_is_the_one_tailed_unequal_variance_t_test():
    reference = {"p": {"sample_dice": {"a": [0.5, 0.6, 0.55], "b": [0.2, 0.3]}},
                 "q": {"sample_dice": {"a": [0.45, 0.5, 0.52], "b": [0.25, 0.2]}}}
    other = {"p": {"sample_dice": {"a": [0.7, 0.65, 0.6], "b": [0.1, 0.2]}},
             "q": {"sample_dice": {"a": [0.62, 0.66, 0.7], "b": [0.2, 0.15]}}}
    result = welch_over_samples(reference, other, ["p", "q"])
    for name in ("a", "b"):
        x = np.array(other["p"]["sample_dice"][name] + other["q"]["sample_dice"][name])
        y = np.array(reference["p"]["sample_dice"][name] + reference["q"]["sample_dice"][name])
        vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
        t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
        df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))  # Welch-Satterthwaite
        assert result["structures"][name]["p"] == pytest.approx(stats.t.sf(t, df))
    assert result["significant"] == 1 and result["of"] == 2  # a better (p ~ 1e-4), b worse (p ~ 0.9)


@pytest.mark.parametrize("d, expected", [(1.0, 10), (0.5, 34)])
def test_pairs_needed_matches_the_tabulated_paired_t_sample_sizes(d, expected):
    """Two-sided paired t-test, alpha 0.05, power 0.8: n = 10 for effect size 1 and 34 for 0.5 (Cohen's tables)."""
    assert pairs_needed(0.02 * d, 0.02) == expected


def test_w_reg_is_chosen_on_the_given_pairs_and_read_off_the_sweep_in_log_w():
    sweep = {1.0: _pairs({"t": 0.5, "h": 0.9}), 0.25: _pairs({"t": 0.7, "h": 0.1}), 4.0: _pairs({"t": 0.6, "h": 0.3})}
    assert choose_w_reg(sweep, ["t"]) == 0.25  # the held-out pair would have chosen 1.0
    values, outside = interpolate_sweep(sweep, 0.5, ["h"])  # halfway between 0.25 and 1 in log w
    assert not outside and values["h"]["dice"] == pytest.approx(0.5)
    values, outside = interpolate_sweep(sweep, 2.0, ["h"])
    assert values["h"]["dice"] == pytest.approx(0.6)
    values, outside = interpolate_sweep(sweep, 0.01, ["h"])
    assert outside and values["h"]["dice"] == pytest.approx(0.1)


@needs_synthbrain
def test_the_default_objective_trains_the_committed_configs_unchanged(tmp_path):
    protocol = Protocol(["SSD", "LCC"], tmp_path / "out", root=ROOT / PROTOCOL)
    assert protocol.training_sets("SSD") == protocol.training_sets("LCC") == []


@needs_synthbrain
@pytest.mark.parametrize("metric", ["SSD", "LCC"])
def test_another_objective_trains_under_its_own_name_with_the_same_budgets(tmp_path, metric):
    protocol = Protocol([metric], tmp_path / "out", root=ROOT / PROTOCOL, objective="alignment_ranking",
                        train_sets=["theta_loss.args.spacing=2"])
    config = load_config(protocol.config(metric, "train"), protocol.training_sets(metric))
    assert config.name == f"synthbrain_paper_budget_{metric}_alignment_ranking"
    assert config.theta_loss.type == "alignment_ranking" and config.theta_loss.alignment_ranking.spacing == 2
    assert protocol.epochs(metric) == budget_epochs(1.5e-4)


def _finished_run(folder: Path, im_pairs: str, theta_loss: dict | None, status: str = "finished") -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_epoch3.pt").write_bytes(b"")
    config = {"data_loader": {"args": {"im_pairs": im_pairs}}}
    if theta_loss is not None:
        config["theta_loss"] = theta_loss
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "status.json").write_text(json.dumps({"status": status}))
    return folder


def test_baselines_reuse_only_finished_runs_that_do_not_depend_on_theta(tmp_path):
    old = Ledger(tmp_path / "old.json")
    done = str(_finished_run(tmp_path / "sweep", "p", None))
    running = str(_finished_run(tmp_path / "running", "p", None, status="running"))
    old.runs = {"sweep:SSD:lr0.01:w1.8": {"folder": done}, "train_frozen:SSD:a": {"folder": done},
                "sweep:SSD:lr0.01:w0.45": {"folder": running}, "sweep:SSD:lr0.01:w0.1125": {"started": 1.0},
                "train:SSD:a": {"folder": done}, "learnt:SSD:lr0.01:a:x1.0": {"folder": done}}
    new = Ledger(tmp_path / "new.json")
    new.runs = {"train_frozen:SSD:a": {"folder": "mine"}}
    new.reuse(old, ("sweep:", "train_frozen:"))
    assert set(new.runs) == {"sweep:SSD:lr0.01:w1.8", "train_frozen:SSD:a"}
    assert new.runs["train_frozen:SSD:a"] == {"folder": "mine"}
    assert new.runs["sweep:SSD:lr0.01:w1.8"]["reused_from"] == str(tmp_path / "old.json")
    assert json.loads((tmp_path / "new.json").read_text()) == new.runs


def test_two_processes_share_one_ledger_without_losing_runs(tmp_path):
    ssd, lcc = Ledger(tmp_path / "runs.json"), Ledger(tmp_path / "runs.json")  # --metrics SSD beside --metrics LCC
    ssd.run("sweep:SSD", lambda: tmp_path / "a", lambda folder: folder)
    lcc.run("sweep:LCC", lambda: tmp_path / "b", lambda folder: folder)
    ssd.run("train:SSD", lambda: tmp_path / "c", lambda folder: folder)
    on_disk = json.loads((tmp_path / "runs.json").read_text())
    assert set(on_disk) == {"sweep:SSD", "sweep:LCC", "train:SSD"}
    assert on_disk["sweep:LCC"]["folder"] == os.path.relpath(tmp_path / "b")
    assert set(Ledger(tmp_path / "runs.json").runs) == set(on_disk)


def test_an_interrupted_run_resumes_only_with_its_own_theta_loss(tmp_path):
    ranking = {"type": "alignment_ranking", "args": {"spacing": 4}}
    _finished_run(tmp_path / "saved" / "name" / "train-1", "/pairs.csv", None, status="running")  # before the key
    _finished_run(tmp_path / "saved" / "name" / "train-2", "/pairs.csv", ranking, status="running")
    found = {theta_loss["type"]: interrupted_training(tmp_path / "saved", "name", Path("/pairs.csv"), 0.0, theta_loss)
             for theta_loss in ({"type": "contrastive", "args": {}}, ranking)}
    assert found["contrastive"].parent.parent.name == "train-1"
    assert found["alignment_ranking"].parent.parent.name == "train-2"
    assert interrupted_training(tmp_path / "saved", "name", Path("/pairs.csv"), 0.0,
                                {"type": "alignment_ranking", "args": {"spacing": 2}}) is None


def test_the_theta_table_sets_the_objectives_side_by_side():
    numbers = {"feature_gain": 1.0, "feature_sharpness": 1.0, "data_gradient_norm": 8.7,
               "data_gradient_smooth_fraction": 0.38, "alignment_preference": 0.09}
    side_by_side = {"SSD": {"budgets": [0.0, 1.0], "objectives": {
        "contrastive": {"steps": [0, 40], "describe": [numbers, {**numbers, "feature_gain": 4.5}]},
        "alignment_ranking": {"steps": [0, 40], "describe": [numbers, {**numbers, "alignment_preference": -0.16}]}}}}
    lines = theta_table(side_by_side).splitlines()
    assert len(lines) == 2 + 4
    assert lines[3] == "| SSD | 0x | 0 | alignment_ranking | 1 | 1.00 | 8.7 | 0.38 | +0.090 |"
    assert lines[4] == "| SSD | 1x | 40 | contrastive | 4.5 | 1.00 | 8.7 | 0.38 | +0.090 |"
    assert lines[5].endswith("| -0.160 |")


def test_theta_side_by_side_describes_both_objectives_at_every_budget(tmp_path, monkeypatch):
    """Tiny runs stand in for fold a's: the contrastive one of the --baselines folder, the alignment-ranking one of
    this folder and the theta-frozen control whose alignment the preference is measured against. Budgets 1x and 4x
    are theta steps 1 and 4 at theta lr 6e-3."""
    import train
    from benchmarks import paper_budget
    from tests.demo_config import demo_config_dict, tiny_config

    monkeypatch.setattr(paper_budget, "BUDGETS", (1.0, 4.0))
    config_path = tiny_config(tmp_path, subjects=6, no_epochs=4, no_iters_q_v=2, keep_checkpoints=[1, 4])
    common = ["optimizer_q_phi.args.lr=0.006", "data_loader.args.batch_size=5"]
    runs = {}
    for name, sets in (("contrastive", []), ("ranking", ['theta_loss={"type": "alignment_ranking"}']),
                       ("frozen", ["trainer.freeze_theta=true"])):
        overrides = [arg for item in common + sets for arg in ("--set", item)]
        runs[name] = str(train.main(["-c", str(config_path), "--device", "cpu", *overrides]).parent.parent)
    root = tmp_path / "protocol"
    (root / "SSD").mkdir(parents=True)
    (root / "fold_a_train.csv").write_text((tmp_path / "data" / "pairs.csv").read_text())
    (root / "SSD" / "config_test_baseline_SSD.json").write_text(json.dumps(
        demo_config_dict(tmp_path / "data", tmp_path / "saved", labels=None)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs.json").write_text(json.dumps({"train:SSD:a": {"folder": runs["contrastive"]},
                                                            "train_frozen:SSD:a": {"folder": runs["frozen"]}}))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "runs.json").write_text(json.dumps({"train:SSD:a": {"folder": runs["ranking"]}}))
    protocol = Protocol(["SSD"], tmp_path / "new", root=root, objective="alignment_ranking",
                        baselines=tmp_path / "old")
    assert protocol.ledger.runs["train_frozen:SSD:a"]["folder"] == runs["frozen"]  # reused
    found = protocol.theta_side_by_side("SSD")
    assert found["budgets"] == [0.0, 1.0, 4.0] and found["aligned_run"] == runs["frozen"]
    assert set(found["objectives"]) == {"contrastive", "alignment_ranking"}
    for objective, run in (("contrastive", runs["contrastive"]), ("alignment_ranking", runs["ranking"])):
        entry = found["objectives"][objective]
        assert entry["run"] == run and entry["steps"] == [0, 1, 4]
        assert [len(d["pairs"]) for d in entry["describe"]] == [5, 5, 5]
        assert all(math.isfinite(d["alignment_preference"]) for d in entry["describe"])
        assert entry["describe"][0] == found["objectives"]["contrastive"]["describe"][0]  # the same Dirac start
        assert entry["describe"][2]["feature_gain"] != entry["describe"][0]["feature_gain"]
    assert json.loads((tmp_path / "new" / "theta_side_by_side_SSD.json").read_text()) == found
    rows = protocol.features("SSD", found)
    assert [(r["metric"], r["feature_steps"], len(r["features"])) for r in rows] == [
        ("SSD contrastive", [0, 1, 4], 3), ("SSD alignment_ranking", [0, 1, 4], 3)]
    assert len(theta_table({"SSD": found}).splitlines()) == 2 + 3 * 2
