"""The optimised q_v loss agrees with a plain implementation of METHOD.md (tests/reference_impl.py).

Same random numbers (same seed, drawn in the order METHOD.md lists them), then the loss and its gradients with
respect to mu, log_var and u are compared: to float64 round-off, and to float32 round-off with the speed
options of the q_v loop on (flushing subnormals, channels-last convolutions, theta frozen).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from model.energy import Energy
from model.similarity import FeatureExtractor, SimilarityMetric
from model.transformation import SVF, SVFFD
from model.variational import QV
from tests import reference_impl as reference
from trainer.q_v_inference import denormals_flushed, frozen
from utils.grid import identity_grid
from utils.similarity import box_sum
from utils.sobolev import sobolev_kernel

DIMS = (10, 12, 14)
CPS = (3, 3, 3)
BATCH = 2
W_REG = {"SSD": 1.8, "LCC": 2.0}
NOISE = 0.1


def smooth_images(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed and moving images (B, 1, *DIMS) in [0, 1] with some structure, and a blob-shaped mask."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand((2 * BATCH, 1, *DIMS), generator=generator, dtype=torch.float64)
    smooth = F.avg_pool3d(F.pad(raw, [1] * 6, mode="replicate"), 3, stride=1)
    smooth = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin())
    grid = identity_grid(DIMS, dtype=torch.float64)
    mask = (grid.square().sum(-1) < 0.8).to(torch.float64).unsqueeze(1).expand(BATCH, 1, *DIMS)
    return smooth[:BATCH].to(dtype), smooth[BATCH:].to(dtype), mask.to(dtype).contiguous()


def make_q_v(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> QV:
    """q_v away from its initial values, so that every term and gradient is generic."""
    generator = torch.Generator().manual_seed(seed)
    size = (BATCH, 3, *shape)
    mu = 0.5 * torch.randn(size, generator=generator, dtype=torch.float64)
    log_var = 2 * math.log(0.5) + 0.1 * torch.randn(size, generator=generator, dtype=torch.float64)
    u = 0.1 + 0.05 * torch.randn(size, generator=generator, dtype=torch.float64)
    return QV(mu.to(dtype), log_var.to(dtype), u.to(dtype))


def make_energy(model: str, kind: str, learnt: bool, dtype: torch.dtype, channels_last: bool = False) -> Energy:
    torch.manual_seed(2)
    similarity = SimilarityMetric(kind, learnable=learnt, channels_last=channels_last)
    if learnt:  # move theta away from the Dirac initialisation, so that f is not the identity
        with torch.no_grad():
            for p in similarity.parameters():
                p.add_(0.1 * torch.randn_like(p))
    transformation = SVF(DIMS) if model == "SVF" else SVFFD(DIMS, CPS)
    return Energy(transformation, similarity, W_REG[kind], sobolev_kernel(3, 0.5, dtype=dtype), NOISE).to(dtype)


def production(energy: Energy, q_v: QV, fixed, moving, mask, seed: int, flush: bool):
    torch.manual_seed(seed)
    with frozen(energy.similarity), denormals_flushed(flush):
        with torch.no_grad():
            fixed_features = energy.similarity.features(fixed)
        loss, _ = energy.q_v_loss(q_v, fixed_features, moving, mask)
        grads = torch.autograd.grad(loss, [q_v.mu, q_v.log_var, q_v.u])
    return loss.detach(), grads


def plain(energy: Energy, q_v: QV, fixed, moving, mask, seed: int, dtype: torch.dtype | None = None):
    """The reference on the same random numbers; in ``dtype`` (float64 for an exact answer) when given."""
    torch.manual_seed(seed)
    dtype = dtype or q_v.mu.dtype
    draws = [d.to(dtype) for d in reference.draw(q_v.mu.shape, moving.shape[2:], q_v.mu.dtype)]
    extractor = copy.deepcopy(energy.similarity.features).to(dtype) if energy.similarity.learnable else None
    cps = energy.transformation.cps if isinstance(energy.transformation, SVFFD) else None
    window = None if energy.similarity.window is None else energy.similarity.window.detach().to(dtype)
    params = [p.detach().to(dtype).requires_grad_() for p in (q_v.mu, q_v.log_var, q_v.u)]
    loss = reference.q_v_loss(*params, fixed.to(dtype), moving.to(dtype), mask.to(dtype), kind=energy.similarity.kind,
                              extractor=extractor, w_reg=energy.w_reg, sobolev_kernel=energy.sobolev_kernel.to(dtype),
                              noise_magnitude=energy.noise_magnitude, cps=cps, window=window,
                              draws=draws)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def assert_agree(fast, slow, tolerance: float) -> None:
    (loss_fast, grads_fast), (loss_slow, grads_slow) = fast, slow
    assert torch.isfinite(loss_slow) and abs(loss_fast - loss_slow) <= tolerance * max(1.0, abs(loss_slow))
    for name, g_fast, g_slow in zip(("mu", "log_var", "u"), grads_fast, grads_slow):
        scale = g_slow.abs().max()
        assert scale > 0
        error = (g_fast - g_slow).abs().max()
        assert error <= tolerance * scale, f"d loss / d {name}: max error {error:.3g}, max |gradient| {scale:.3g}"


CASES = [(model, kind, learnt) for model in ("SVF", "SVFFD") for kind in ("SSD", "LCC") for learnt in (False, True)]


@pytest.mark.parametrize("model,kind,learnt", CASES)
def test_q_v_loss_matches_reference_float64(model, kind, learnt):
    energy = make_energy(model, kind, learnt, torch.float64)
    q_v = make_q_v(energy.transformation.velocity_shape, torch.float64)
    images = smooth_images(torch.float64)
    assert_agree(production(energy, q_v, *images, seed=3, flush=False), plain(energy, q_v, *images, seed=3), 1e-10)


@pytest.mark.parametrize("model,kind,learnt", CASES)
def test_q_v_loss_matches_reference_float32_with_speed_options(model, kind, learnt):
    """Production float32 (subnormals flushed, channels-last convolutions) is as accurate as plain float32 code.

    Both are compared with the plain code in float64 on the same float32 inputs and random numbers: the
    production error may not exceed a few times the round-off error of the plain float32 computation.
    """
    energy = make_energy(model, kind, learnt, torch.float32, channels_last=learnt)
    q_v = make_q_v(energy.transformation.velocity_shape, torch.float32)
    images = smooth_images(torch.float32)
    fast = production(energy, q_v, *images, seed=4, flush=True)
    slow = plain(energy, q_v, *images, seed=4)
    exact = plain(energy, q_v, *images, seed=4, dtype=torch.float64)
    for name, a, b, c in zip(("loss", "mu", "log_var", "u"), [fast[0], *fast[1]], [slow[0], *slow[1]],
                             [exact[0], *exact[1]]):
        error_fast, error_slow = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        floor = 1e-6 * c.abs().max()
        assert error_fast <= 4 * error_slow + floor, f"{name}: error {error_fast:.3g} vs plain float32 {error_slow:.3g}"


def test_noise_and_samples_follow_the_seed():
    """Different seeds give different losses: the comparison above does exercise the random numbers."""
    energy = make_energy("SVF", "SSD", False, torch.float64)
    q_v = make_q_v(DIMS, torch.float64)
    images = smooth_images(torch.float64)
    assert production(energy, q_v, *images, seed=5, flush=False)[0] != production(energy, q_v, *images, seed=6,
                                                                                     flush=False)[0]


@pytest.mark.parametrize("s", [0, 1, 2])
def test_box_sum_is_the_full_box_convolution(s):
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(box_sum(x, s), reference.box_3d(x, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_feature_extractor_gradient(channels_last):
    """The frozen-theta fast path (input gradient as a forward convolution) is the gradient of f."""
    torch.manual_seed(0)
    extractor = FeatureExtractor(channels_last=channels_last).double()
    with torch.no_grad():
        for p in extractor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image = torch.rand(2, 1, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    with frozen(extractor):
        assert torch.autograd.gradcheck(extractor, (image,))
        torch.testing.assert_close(extractor(image), reference.features(image, extractor))


def test_channels_last_changes_nothing_but_round_off():
    torch.manual_seed(0)
    plain_extractor = FeatureExtractor()
    fast_extractor = FeatureExtractor(channels_last=True)
    fast_extractor.load_state_dict(plain_extractor.state_dict())
    image = torch.rand(2, 1, 9, 10, 11)
    for extractor_grads in (False, True):  # theta learnt (theta step) or frozen (q_v iterations)
        outputs, grads = [], []
        for extractor in (plain_extractor, fast_extractor):
            x = image.clone().requires_grad_()
            with (nullcontext() if extractor_grads else frozen(extractor)):
                out = extractor(x)
                inputs = [x] + (list(extractor.parameters()) if extractor_grads else [])
                grads.append(torch.autograd.grad((out * image).sum(), inputs))
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_identity_grid_is_cached_and_not_an_inference_tensor():
    with torch.inference_mode():
        grid = identity_grid((4, 5, 6), dtype=torch.float32)
    assert grid is identity_grid([4, 5, 6], torch.device("cpu"))
    assert not grid.is_inference() and not grid.requires_grad
    torch.testing.assert_close(grid, reference.identity_grid((4, 5, 6), torch.float32))


def test_denormals_flushed_restores_the_mode():
    def flushes() -> bool:
        return (torch.tensor([1e-30]) * 1e-10).item() == 0.0

    assert not flushes()
    with denormals_flushed():
        assert flushes()
        with denormals_flushed():
            assert flushes()
        assert flushes()  # the inner context leaves the outer one's mode alone
    assert not flushes()
    with denormals_flushed(enabled=False):
        assert not flushes()
