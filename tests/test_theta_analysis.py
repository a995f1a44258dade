"""The CPU protocol's description of theta: feature gain and sharpness, the data term's pull and how much of it the
smoothing keeps, q_v motion and the preference for an aligned transformation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from benchmarks.ssd_investigation import training_batch
from benchmarks.theta_analysis import (analyse, describe, feature_statistics, gradient_magnitude, q_v_motion,
                                      smooth_fraction)
from model.similarity import SimilarityMetric
from tests.demo_config import tiny_config, trained_with_alignment_ranking
from trainer.build import build_energy
from utils.config import load_config


def _image(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((20, 20, 20)))


def test_identity_features_have_gain_and_sharpness_one():
    image = _image()
    found = feature_statistics(image, image.clone(), torch.ones_like(image))
    assert found == {"feature_gain": pytest.approx(1.0), "feature_sharpness": pytest.approx(1.0)}


def test_scaled_features_have_that_gain_and_the_same_sharpness():
    image = _image()
    found = feature_statistics(image, 3 * image + 1, torch.ones_like(image))
    assert found == {"feature_gain": pytest.approx(3.0), "feature_sharpness": pytest.approx(1.0)}


def test_blurred_features_are_less_sharp():
    image = _image()
    blurred = torch.from_numpy(gaussian_filter(image.numpy(), 1.0))
    assert feature_statistics(image, blurred, torch.ones_like(image))["feature_sharpness"] < 0.5


def test_the_gradient_magnitude_of_a_ramp_is_its_slope():
    z, y, x = torch.meshgrid(*(torch.arange(12.0),) * 3, indexing="ij")
    image = 0.3 * z - 0.4 * x  # |grad| = 0.5 everywhere
    torch.testing.assert_close(gradient_magnitude(image), torch.full((11, 11, 11), 0.5))
    features = 2 * image
    found = feature_statistics(image, features, torch.ones_like(image))
    assert found["feature_gain"] == pytest.approx(2.0)
    assert found["feature_sharpness"] == pytest.approx(1.0)


class _Scaled(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def test_ssd_features_scaled_by_two_pull_four_times_harder(tmp_path):
    """SSD is quadratic in f: f = 2x makes the data term, and its gradient at the identity, 4x the baseline's."""
    config = load_config(tiny_config(tmp_path, size=16, subjects=3), ["model.args.learnable=false"], mode="test")
    batch = training_batch(config, 2)
    baseline = SimilarityMetric("SSD", learnable=False)
    scaled = SimilarityMetric("SSD", learnable=False)
    scaled.features = _Scaled(2.0)
    base, found = describe(baseline, config, batch), describe(scaled, config, batch)
    assert base["data_gradient_norm"] > 0
    assert found["data_gradient_norm"] == pytest.approx(4 * base["data_gradient_norm"], rel=1e-4)
    assert found["feature_gain"] == pytest.approx(2.0) and base["feature_gain"] == pytest.approx(1.0)
    assert "window_centre_fraction" not in found


def test_the_initial_lcc_window_centre_is_one_of_27(tmp_path):
    config = load_config(tiny_config(tmp_path, size=16, subjects=3))
    batch = training_batch(config, 1)
    torch.manual_seed(0)
    found = describe(SimilarityMetric("LCC", learnable=True), config, batch)
    assert found["window_centre_fraction"] == pytest.approx(1 / 27)


def _velocity(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A smooth random velocity (N, 3, D, H, W) of about a voxel."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    return torch.from_numpy(gaussian_filter(noise, (0, 0, 2, 2, 2)) * 5).float()


def test_a_pair_that_is_already_aligned_prefers_the_identity(tmp_path):
    """With M = F the identity is the best alignment, so any other transformation has a negative preference."""
    config = load_config(tiny_config(tmp_path, size=16, subjects=3), mode="test")
    batch = training_batch(config, 2)
    batch["moving"]["im"] = batch["fixed"]["im"].clone()
    velocity = _velocity((2, 3, 16, 16, 16))
    lcc = SimilarityMetric("LCC", learnable=False)
    assert describe(lcc, config, batch, velocity)["alignment_preference"] < -1e-3
    assert describe(lcc, config, batch, torch.zeros_like(velocity))["alignment_preference"] == 0.0


def test_the_alignment_preference_of_ssd_does_not_change_with_the_gain_of_f(tmp_path):
    config = load_config(tiny_config(tmp_path, size=16, subjects=3), ["model.args.learnable=false"], mode="test")
    batch = training_batch(config, 2)
    velocity = _velocity((2, 3, 16, 16, 16), seed=1)
    baseline = SimilarityMetric("SSD", learnable=False)
    scaled = SimilarityMetric("SSD", learnable=False)
    scaled.features = _Scaled(2.0)
    found = describe(baseline, config, batch, velocity)["alignment_preference"]
    assert found != 0.0
    assert describe(scaled, config, batch, velocity)["alignment_preference"] == pytest.approx(found, rel=1e-4)


def test_the_smoothing_keeps_a_constant_field_and_a_27th_of_a_checkerboard(tmp_path):
    """The demo's Sobolev kernel (s 3, lambda 0.5) sums to 1 and answers the Nyquist frequency with 1/3 per axis
    (the transcribed kernel [1, 4, 15, 56, 15, 4, 1] / 96, alternating sum 32/96), so a voxel checkerboard keeps
    1/27 of its norm away from the borders; the borders add a little."""
    config = load_config(tiny_config(tmp_path, size=16, subjects=3), mode="test")
    energy = build_energy(config, SimilarityMetric("SSD", learnable=False))
    assert smooth_fraction(energy, torch.full((1, 3, 12, 12, 12), 0.7)) == pytest.approx(1.0)
    z, y, x = torch.meshgrid(*(torch.arange(32),) * 3, indexing="ij")
    checkerboard = (-1.0) ** (z + y + x)
    found = smooth_fraction(energy, checkerboard.expand(1, 3, 32, 32, 32))
    assert 1 / 27 - 1e-4 < found < 1.5 / 27


def test_q_v_motion_is_zero_without_iterations_and_positive_with_them(tmp_path):
    config = load_config(tiny_config(tmp_path, size=16, subjects=3), mode="test")
    batch = training_batch(config, 1)
    energy = build_energy(config, SimilarityMetric("LCC", learnable=False))
    images = batch["fixed"]["im"], batch["moving"]["im"], batch["fixed"]["mask"]
    assert q_v_motion(energy, config, *images, 0) == {"q_v_mean_rms": 0.0, "q_v_smoothed_mean_rms": 0.0}
    moved = q_v_motion(energy, config, *images, 4)
    assert 0 < moved["q_v_smoothed_mean_rms"] <= moved["q_v_mean_rms"]


def test_the_dirac_initialisation_puts_the_first_layer_s_weight_on_the_centre_tap(tmp_path):
    """METHOD.md: centre taps positive and L1-normalised over the 4 output channels (mean 1/4), the rest ~1e-7."""
    config = load_config(tiny_config(tmp_path, size=16, subjects=3))
    batch = training_batch(config, 1)
    torch.manual_seed(0)
    found = describe(SimilarityMetric("SSD", learnable=True), config, batch)
    assert found["first_layer_centre_tap"] == pytest.approx(0.25, rel=1e-4)
    assert found["first_layer_off_centre_tap"] < 1e-6
    assert "first_layer_centre_tap" not in describe(SimilarityMetric("SSD", learnable=False), config, batch)


def test_theta_analysis_describes_a_metric_learnt_with_the_alignment_ranking_loss(tmp_path):
    """The numbers of benchmarks.theta_analysis for a checkpoint of the issue-20 objective, beside its Dirac
    initialisation: the preference for an aligned velocity included."""
    last = trained_with_alignment_ranking(tmp_path)
    run = last.parent.parent
    pairs = Path(load_config(run / "config.json").data_loader.args.im_pairs)
    described = analyse(run / "config.json", pairs, [None, last], no_pairs=2, aligned_run=run)
    keys = {"data_gradient_norm", "data_gradient_smooth_fraction", "feature_gain", "feature_sharpness",
            "alignment_preference", "first_layer_centre_tap", "first_layer_off_centre_tap"}
    for numbers in described:
        assert keys <= set(numbers) and all(math.isfinite(numbers[k]) for k in keys)
    initial, learnt = described
    assert initial["feature_gain"] == pytest.approx(1.0, abs=1e-3)
    assert learnt["first_layer_off_centre_tap"] > 10 * initial["first_layer_off_centre_tap"]
