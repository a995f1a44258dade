"""Coarse-to-fine q_v inference (trainer.q_v_pyramid): level grids, velocities moved between levels (analytic
translations), the loss-plateau stop, the config checks, and a registration that recovers a known shift."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.energy import Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QV
from trainer.q_v_inference import LossPlateau, infer_q_v, infer_q_v_pyramid
from trainer.registration_config import reference_config, registration_config
from utils.config import ConfigError, parse_config
from utils.flow import integrate_velocity, warp
from utils.pyramid import downsample_image, downsample_mask, level_shape, level_shapes, resize_velocity

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dims, factor, expected", [((128, 128, 128), 4, (33, 33, 33)), ((64, 48, 33), 2, (33, 25, 17)),
                                                    ((16, 16, 16), 1, (16, 16, 16))])
def test_level_shape_keeps_the_corner_voxels(dims, factor, expected):
    assert level_shape(dims, factor) == expected


def test_levels_too_small_are_skipped():
    assert level_shapes((16, 16, 16), [4, 2, 1]) == [(9, 9, 9), (16, 16, 16)]
    assert level_shapes((128,) * 3, [4, 2, 1]) == [(33,) * 3, (65,) * 3, (128,) * 3]


def test_a_translation_moves_between_levels_as_the_same_world_motion():
    """A constant velocity c (coarse voxels) integrates to a translation by c; on the finer grid it must be the same
    translation in world terms: c (n_fine - 1) / (n_coarse - 1) fine voxels, per axis."""
    coarse, fine = (9, 13, 17), (17, 25, 33)
    velocity = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, *coarse).contiguous()
    resized = resize_velocity(velocity, fine)
    expected = torch.tensor([0.5 * 16 / 8, -1.0 * 24 / 12, 0.25 * 32 / 16]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(resized, expected.expand_as(resized))
    inside = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the border padding
    torch.testing.assert_close(integrate_velocity(resized)[inside], expected.expand_as(resized)[inside])


def test_q_v_resized_scales_the_mean_and_keeps_the_spread():
    q_v = QV.initial(1, (9, 9, 9), 0.5, 0.1)
    with torch.no_grad():
        q_v.mu.fill_(1.0)
    resized = q_v.resized((17, 17, 17))
    torch.testing.assert_close(resized.mu, torch.full((1, 3, 17, 17, 17), 2.0))
    torch.testing.assert_close(resized.log_var, torch.full((1, 3, 17, 17, 17), 2 * math.log(0.5)))
    torch.testing.assert_close(resized.u, torch.full((1, 3, 17, 17, 17), 0.1))


def test_downsampling_keeps_a_linear_ramp_and_a_mask():
    ramp = torch.linspace(0, 1, 33).view(1, 1, 33, 1, 1).expand(1, 1, 33, 33, 33).contiguous()
    small = downsample_image(ramp, (17, 17, 17))
    # the blur is symmetric and the ramp linear: unchanged away from the replicate-padded ends
    torch.testing.assert_close(small[0, 0, 3:-3, 8, 8], torch.linspace(0, 1, 17)[3:-3], atol=1e-5, rtol=0)
    mask = torch.zeros(1, 1, 33, 33, 33)
    mask[..., 8:25, 8:25, 8:25] = 1
    assert downsample_mask(mask, (17, 17, 17))[0, 0, 4:13, 4:13, 4:13].all()


@pytest.mark.parametrize("losses, stops_at", [([10.0] * 8, 4), ([10.0 - i for i in range(8)], None),
                                              ([10.0, 10.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 6)])
def test_loss_plateau(losses, stops_at):
    """window 2, tolerance 1 %: stops at the end of the first window that did not improve on the previous one."""
    plateau = LossPlateau(window=2, tolerance=0.01)
    stopped = next((i for i, loss in enumerate(losses, start=1) if plateau(i, {"loss": torch.tensor([loss])})), None)
    assert stopped == stops_at


def test_pyramid_is_refused_where_it_does_not_apply():
    data = reference_config("SSD", "SVFFD")
    with pytest.raises(ConfigError, match="q_v_pyramid: coarse-to-fine inference needs the dense SVF_3D"):
        registration_config(data, (16,) * 3, ROOT, schedule="pyramid")
    train = json_config("configs/demo/train.json")
    train["trainer"]["q_v_pyramid"] = {}
    with pytest.raises(ConfigError, match="training keeps the reference's single-resolution"):
        parse_config(train, ROOT / "configs" / "demo", mode="train")
    with pytest.raises(ConfigError, match="decreasing grid factors ending at 1"):
        registration_config(reference_config("SSD", "SVF"), (16,) * 3, ROOT, schedule="pyramid",
                            overrides=["trainer.q_v_pyramid.levels=[2, 4, 1]"])


def json_config(relative: str) -> dict:
    return json.loads((ROOT / relative).read_text())


def shifted_pair(size: int = 24, shift: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth blob and the same blob moved by ``shift`` voxels along axis 0 (analytic)."""
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    centre = torch.tensor([size / 2 - 1, size / 2, size / 2]).view(3, 1, 1, 1)
    fixed = torch.exp(-((grid - centre) ** 2).sum(0) / (2 * 3.0 ** 2))
    moving = torch.exp(-((grid - centre - torch.tensor([shift, 0, 0]).view(3, 1, 1, 1)) ** 2).sum(0) / (2 * 3.0 ** 2))
    return fixed[None, None], moving[None, None]


def test_pyramid_recovers_a_known_shift():
    """The moving blob is the fixed one moved by +2 voxels along axis 0: phi(x) = x + 2 there, so the posterior mean's
    displacement at the blob's centre is about +2 voxels along axis 0 and 0 along the others."""
    fixed, moving = shifted_pair()
    config = registration_config(reference_config("SSD", "SVF"), (24,) * 3, ROOT, schedule="pyramid",
                                 iterations=120, overrides=["optimizer_q_v.args.lr=0.1", "reg_loss.args.w_reg=0.05",
                                                            "trainer.uniform_noise.enabled=false"])
    energy = Energy(SVF((24,) * 3), SimilarityMetric("SSD", False), 0.05, None, 0.0)
    torch.manual_seed(0)
    q_v, _, levels = infer_q_v_pyramid(energy, fixed, moving, torch.ones_like(fixed), config)
    assert [level["shape"] for level in levels] == [[13] * 3, [24] * 3]
    with torch.no_grad():
        displacement = energy.displacement(q_v.mu)[0, :, 11, 12, 12]
    assert abs(displacement[0].item() - 2.0) < 0.5 and displacement[1:].abs().max() < 0.3
    assert all(level["iterations"] <= 120 for level in levels)
    # infer_q_v runs the pyramid when the config asks for it and there is no saved state
    torch.manual_seed(0)
    q_v_again, _ = infer_q_v(energy, fixed, moving, torch.ones_like(fixed), config)
    torch.testing.assert_close(q_v_again.mu, q_v.mu)
    assert warp(moving, energy.displacement(q_v.mu)).sub(fixed).abs().sum() < 0.3 * moving.sub(fixed).abs().sum()
