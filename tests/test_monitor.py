"""TensorBoard during training: per-step losses, per-epoch Dice/ASD/folding, images and theta histograms."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_entry
from data_loader.demo import make_demo_dataset
from tests.demo_config import demo_config_dict



def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder / "log"), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("log_period,images", [(1, True), (100, True), (1, False)])
def test_training_logs_losses_epoch_metrics_images_and_histograms(tmp_path, log_period, images):
    data = make_demo_dataset(tmp_path / "data", no_subjects=3, size=12)
    config = demo_config_dict(data, tmp_path / "saved", dims=(12, 12, 12), batch_size=1, no_iters_q_v=2,
                              no_epochs=2, log_period=log_period, save_figures=images)
    (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint = train_entry.main(["-c", str(tmp_path / "config.json"), "--device", "cpu"])
    logged = events(checkpoint.parents[1])
    tags = logged.Tags()

    assert [e.step for e in logged.Scalars("q_v/loss")] == [1, 2, 3, 4]  # every step: 2 pairs, 2 epochs
    assert [e.step for e in logged.Scalars("theta/loss")] == [1, 2, 3, 4]
    for key in ("dice", "asd_mm", "folding_percent_mask"):
        values = logged.Scalars(f"epoch/{key}")
        assert [e.step for e in values] == [2, 4]
    assert all(0.0 <= e.value <= 1.0 for e in logged.Scalars("epoch/dice"))
    assert any(tag.startswith("theta/features.convs.0") for tag in tags["histograms"])
    assert {"q_f/sigma", "q_f/u"} <= set(tags["histograms"])
    expected = {f"images/{name}" for name in ("fixed", "moving", "warped", "q_v/displacement_mm", "q_v/sigma",
                                               "q_f/sigma", "q_f/u")}
    if not images:
        assert not tags["images"]
        return
    assert set(tags["images"]) == expected
    steps = [e.step for e in logged.Images("images/warped")]
    assert steps == ([1, 2, 3, 4] if log_period == 1 else [1])  # step 1, then every log_period steps
    assert logged.Images("images/fixed")[0].height == 12
