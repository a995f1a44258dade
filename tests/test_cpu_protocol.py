"""The CPU protocol's analysis: per-pair means from metrics.csv, the paired test, curves read from TensorBoard."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks.cpu_protocol import PROTOCOL, _pairs, curves, paired_test, per_pair


def test_per_pair_means_only_ok_rows_of_the_posterior_mean(tmp_path):
    rows = [("a", "mean", "ok", 0.5, 2.0), ("a", "mean", "ok", 0.7, 4.0),
            ("a", "mean", "missing_in_warped", 0.0, "nan"), ("a", "identity", "ok", 0.1, 9.0),
            ("a", "0", "ok", 0.2, 9.0), ("b", "mean", "ok", 0.9, 1.0)]
    with open(tmp_path / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pair_id", "sample", "status", "dice", "asd_mm"])
        writer.writerows(rows)
    assert per_pair(tmp_path) == {"a": {"dice": pytest.approx(0.6), "asd_mm": pytest.approx(3.0)},
                                  "b": {"dice": pytest.approx(0.9), "asd_mm": pytest.approx(1.0)}}


def test_paired_test_of_four_pairs_that_all_improve():
    """Four positive differences: the exact two-sided signed-rank p is 2 * (1/2)^4 = 0.125, the smallest possible."""
    baseline = {p: {"dice": 0.5, "asd_mm": 2.0} for p in "abcd"}
    learnt = {p: {"dice": 0.5 + 0.01 * (k + 1), "asd_mm": 2.0 - 0.1 * (k + 1)} for k, p in enumerate("abcd")}
    result = paired_test(baseline, learnt, ["a", "b", "c", "d", "not-registered"])
    assert result["pairs"] == ["a", "b", "c", "d"]
    assert result["smallest_attainable_p"] == pytest.approx(0.125)
    assert result["dice"]["wilcoxon_p"] == pytest.approx(0.125)
    assert result["asd_mm"]["wilcoxon_p"] == pytest.approx(0.125)
    assert result["dice"]["mean_difference"] == pytest.approx(0.025)
    assert result["dice"]["differences"] == pytest.approx([0.01, 0.02, 0.03, 0.04])


def test_curves_are_the_epoch_scalars_of_the_run(tmp_path):
    writer = SummaryWriter(str(tmp_path / "log"))
    for step, dice in ((1, 0.5), (2, 0.55)):
        writer.add_scalar("epoch/dice", dice, step)
        writer.add_scalar("q_v/loss", 1.0, step)
    writer.close()
    found = curves(tmp_path)
    assert list(found) == ["epoch/dice"]
    assert found["epoch/dice"] == [[1, pytest.approx(0.5)], [2, pytest.approx(0.55)]]


def test_the_split_holds_out_four_dev_pairs_and_trains_on_the_other_five_in_one_batch():
    """The protocol's split and its configs: disjoint, together the dev pairs; one theta step per epoch."""
    root = Path(__file__).resolve().parents[1]
    train, held_out = _pairs(root / PROTOCOL / "pairs_train.csv"), _pairs(root / PROTOCOL / "pairs_held_out.csv")
    assert (len(train), len(held_out)) == (5, 4) and not set(train) & set(held_out)
    dev = root.parent / "shared" / "data" / "synthbrain" / "pairs_dev.csv"
    if not dev.is_file():
        pytest.skip(f"SynthBrain data not found at {dev.parent}")
    assert sorted(train + held_out) == sorted(_pairs(dev))
    for metric in ("SSD", "LCC"):
        config = json.loads((root / PROTOCOL / metric / f"config_train_{metric}.json").read_text())
        assert config["data_loader"]["args"]["batch_size"] == len(train)
        assert config["data_loader"]["args"]["im_pairs"] == "pairs_train.csv"
