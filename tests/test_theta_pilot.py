"""benchmarks.theta_pilot end to end on a tiny grid: both theta losses step, and the table reports what they did."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.theta_pilot import main

pytestmark = pytest.mark.slow


def test_the_pilot_steps_each_theta_loss_and_reports_theta(tmp_path, capsys):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthbrain"  # the configs' data_path
    if not (data / "pairs_dev.csv").is_file():
        pytest.skip(f"SynthBrain data not found at {data}")
    variants = {"contrastive": ["SSD", None], "ranking": ["SSD", {"type": "alignment_ranking"}]}
    result = main(["--variants", json.dumps(variants), "--dims", "8", "--steps", "2", "--out", str(tmp_path / "p.json")])
    assert result["pairs"] == ["sub-01_sub-02", "sub-01_sub-03", "sub-01_sub-04"]  # fold a's training pairs
    assert json.loads((tmp_path / "p.json").read_text()) == result
    for name, theta_loss in (("contrastive", "contrastive"), ("ranking", "alignment_ranking")):
        found = result["variants"][name]
        assert found["theta_loss"] == theta_loss and len(found["loss"]) == 2
        assert [d["step"] for d in found["describe"]] == [0, 1, 2]
        assert found["describe"][0]["feature_gain"] == pytest.approx(1.0, abs=1e-3)
        assert found["describe"][2]["first_layer_off_centre_tap"] > found["describe"][0]["first_layer_off_centre_tap"]
    assert result["variants"]["ranking"]["theta_loss_args"]["spacing"] == 1
    assert "| ranking | 2 |" in capsys.readouterr().out
