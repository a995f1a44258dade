"""Similarity maps and data terms (utils.similarity, model.similarity) and the q_v energy (model.energy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from model.energy import Energy
from model.similarity import FeatureExtractor, SimilarityMetric
from model.transformation import SVF
from model.variational import QV
from trainer.q_v_inference import frozen
from utils.flow import warp
from utils.regulariser import reg_term
from utils.similarity import lcc_data_term, lcc_map, lcc_map_textbook, ssd_data_term, ssd_map

EPS = 1e-5  # the reference's constant in the LCC denominator, written here independently of the module
from utils.sobolev import separable_filter, sobolev_kernel


def _windows(image: np.ndarray, s: int) -> np.ndarray:
    """(D, H, W, (2s+1)^3): the values of the window around every voxel of an edge-padded volume."""
    return sliding_window_view(np.pad(image, s, mode="edge"), (2 * s + 1,) * 3).reshape(*image.shape, -1)


def numpy_lcc_map(fixed: np.ndarray, warped: np.ndarray, s: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The reference's LCC, brute force on volumes (D, H, W): K the (weighted) window sum, n = (2s+1)^3,
    d = x - K(x) / n at every voxel, then cross = K(d_F d_M), var = K(d^2), z = cross^2 / (var_F var_M + eps)."""
    n = (2 * s + 1) ** 3
    weights = np.ones(n) if weights is None else weights.reshape(-1)

    def window(image):
        return (_windows(image, s) * weights).sum(-1)

    d_f, d_w = fixed - window(fixed) / n, warped - window(warped) / n
    cross = window(d_f * d_w)
    return cross ** 2 / (window(d_f ** 2) * window(d_w ** 2) + EPS)


def numpy_lcc_map_textbook(fixed: np.ndarray, warped: np.ndarray, s: int) -> np.ndarray:
    """Window-centred form: every value of a window minus the mean of that window."""
    f, w = _windows(fixed, s), _windows(warped, s)
    f_c, w_c = f - f.mean(-1, keepdims=True), w - w.mean(-1, keepdims=True)
    cross = (f_c * w_c).sum(-1)
    return cross ** 2 / ((f_c ** 2).sum(-1) * (w_c ** 2).sum(-1) + EPS)


def random_images(shape, batch=1, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, *shape, dtype=dtype, generator=generator) for _ in range(2)]


def smooth_images(shape, batch, seed):
    """Images in [0, 1] with some structure (so LCC windows are not pure noise)."""
    kernel = torch.ones(3, dtype=torch.float32) / 3
    images = []
    for image in random_images(shape, batch, seed, torch.float32):
        smooth = separable_filter(image, kernel)
        images.append((smooth - smooth.min()) / (smooth.max() - smooth.min()))
    return images


def test_ssd_map_of_an_image_with_itself_is_zero():
    fixed, warped = random_images((6, 7, 8))
    assert torch.count_nonzero(ssd_map(fixed, fixed)) == 0
    torch.testing.assert_close(ssd_map(fixed, warped), (fixed - warped) ** 2)


@pytest.mark.parametrize("a, b", [(2.0, 0.3), (-0.5, 1.0), (1.0, 0.0), (10.0, -4.0)])
def test_lcc_of_linearly_related_images_is_one(a, b):
    fixed, _ = random_images((10, 11, 12))
    z = lcc_map(fixed, a * fixed + b)
    # z = a^2 V^2 / (a^2 V^2 + eps) with V the windowed variance sum (~2 here): 1 up to the eps term
    assert z.max() <= 1.0
    assert z.min() > 1.0 - 1e-3


def test_lcc_of_independent_noise_is_small():
    fixed, warped = random_images((12, 12, 12))
    z = lcc_map(fixed, warped)
    assert 0.0 <= z.min() and z.max() <= 1.0
    assert z.mean() < 0.1  # E[r^2] ~ 1 / (N - 1) for N = 27 independent samples per window


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("shape", [(5, 6, 7), (8, 5, 6)])
def test_lcc_map_matches_brute_force(s, shape):
    fixed, warped = random_images(shape, batch=2, seed=s)
    warped = 0.6 * fixed + 0.4 * warped  # partly correlated, so z covers (0, 1)
    z = lcc_map(fixed, warped, s)
    z_textbook = lcc_map_textbook(fixed, warped, s)
    assert z.shape == z_textbook.shape == fixed.shape
    for i in range(2):
        f, w = fixed[i, 0].numpy(), warped[i, 0].numpy()
        np.testing.assert_allclose(z[i, 0].numpy(), numpy_lcc_map(f, w, s), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(z_textbook[i, 0].numpy(), numpy_lcc_map_textbook(f, w, s), rtol=1e-9, atol=1e-12)


def test_lcc_map_with_a_learnt_window_matches_brute_force():
    """Weighted window in every sum, and the local means still divided by n = 27 (not by the sum of the weights)."""
    fixed, warped = random_images((6, 7, 5), batch=2, seed=7)
    weights = torch.rand(1, 1, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.5
    z = lcc_map(fixed, warped, 1, weights)
    for i in range(2):
        expected = numpy_lcc_map(fixed[i, 0].numpy(), warped[i, 0].numpy(), 1, weights.numpy())
        np.testing.assert_allclose(z[i, 0].numpy(), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lcc_map(fixed, warped, 1, torch.ones_like(weights)), lcc_map(fixed, warped, 1))


def test_reference_and_textbook_lcc_are_different_objectives():
    """On structured images the two forms differ by far more than round-off (METHOD.md: ~2x on a real pair)."""
    fixed, warped = smooth_images((12, 12, 12), batch=1, seed=3)
    reference, textbook = lcc_map(fixed, warped).sum(), lcc_map_textbook(fixed, warped).sum()
    assert abs(reference - textbook) > 0.1 * abs(textbook)


def test_data_terms_use_only_the_mask_and_are_per_pair():
    generator = torch.Generator().manual_seed(2)
    z = torch.rand(2, 1, 6, 7, 8, dtype=torch.float64, generator=generator)
    mask = (torch.rand(2, 1, 6, 7, 8, generator=generator) > 0.5).to(torch.float64)
    expected = torch.stack([z[i][mask[i] > 0].sum() for i in range(2)])
    torch.testing.assert_close(ssd_data_term(z, mask), 0.5 * expected)
    torch.testing.assert_close(lcc_data_term(z, mask), -expected)
    changed = torch.where(mask > 0, z, 100.0 + z)
    torch.testing.assert_close(ssd_data_term(changed, mask), ssd_data_term(z, mask))
    torch.testing.assert_close(lcc_data_term(changed, mask), lcc_data_term(z, mask))


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_metric_ignores_voxels_outside_the_mask(kind):
    fixed, warped = random_images((10, 10, 10))
    mask = torch.zeros_like(fixed)
    mask[..., 3:7, 3:7, 3:7] = 1.0
    changed = warped.clone()
    # the reference LCC reaches 2s = 2 voxels out of the mask (a window of local means): change only voxels further
    far = torch.ones_like(fixed, dtype=torch.bool)
    far[..., 1:9, 1:9, 1:9] = False
    changed[far] = 5.0
    metric = SimilarityMetric(kind, learnable=False)
    torch.testing.assert_close(metric(fixed, changed, mask), metric(fixed, warped, mask))
    everywhere = torch.ones_like(mask)
    assert not torch.allclose(metric(fixed, changed, everywhere), metric(fixed, warped, everywhere))


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_baseline_metric_is_the_data_term(kind):
    fixed, warped = random_images((8, 9, 10), batch=2)
    mask = torch.ones_like(fixed)
    metric = SimilarityMetric(kind, learnable=False)
    assert list(metric.parameters()) == [] and not metric.learnable
    expected = (ssd_data_term(ssd_map(fixed, warped), mask) if kind == "SSD"
                else lcc_data_term(lcc_map(fixed, warped), mask))
    torch.testing.assert_close(metric(fixed, warped, mask), expected)
    assert (metric(fixed, warped, mask) > 0).all() == (kind == "SSD")


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirac_initialised_metric_equals_the_baseline(kind, seed):
    """The paper's claim: before training the learnt metric is SSD or LCC, on images in [0, 1]."""
    torch.manual_seed(seed)
    learnt, baseline = SimilarityMetric(kind, learnable=True), SimilarityMetric(kind, learnable=False)
    fixed, warped = smooth_images((12, 12, 12), batch=2, seed=seed)
    mask = torch.zeros_like(fixed)
    mask[..., 2:10, 1:11, 2:11] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(learnt(fixed, warped, mask), baseline(fixed, warped, mask), rtol=1e-4, atol=0)
        torch.testing.assert_close(learnt.features(fixed), fixed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("no_features", [(4, 8, 8), (2, 4, 4), (3, 5)])
def test_feature_extractor_starts_as_identity_and_is_learnable(no_features):
    torch.manual_seed(0)
    extractor = FeatureExtractor(no_features)
    assert [conv.out_channels for conv in extractor.convs] == list(no_features)
    image = torch.rand(2, 1, 7, 8, 9)
    with torch.no_grad():
        torch.testing.assert_close(extractor(image), image, rtol=0, atol=1e-4)
    metric = SimilarityMetric("SSD", learnable=True, no_features=no_features)
    parameters = list(metric.parameters())
    assert metric.learnable and parameters and all(p.requires_grad for p in parameters)
    # gradients reach theta
    metric(image[:1], image[1:], torch.ones_like(image[:1])).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in parameters)


def test_feature_extractor_pads_by_replication():
    # with averaging weights a constant image stays constant up to the border only with replicate padding
    extractor = FeatureExtractor((4, 8, 8)).double()
    with torch.no_grad():
        for conv in extractor.convs:
            conv.weight.fill_(1.0 / (conv.in_channels * 27))
            conv.bias.zero_()
        extractor.aggregation.weight.fill_(1.0 / 8)
        out = extractor(torch.full((1, 1, 5, 6, 7), 0.7, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full_like(out, 0.7))


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="NCC"):
        SimilarityMetric("NCC", learnable=False)


def test_gradcheck_lcc_map():
    fixed, warped = random_images((4, 5, 6), seed=3)
    assert torch.autograd.gradcheck(lcc_map, (fixed.requires_grad_(), warped.requires_grad_()))


def test_gradcheck_ssd_map():
    fixed, warped = random_images((3, 4, 5), seed=4)
    assert torch.autograd.gradcheck(ssd_map, (fixed.requires_grad_(), warped.requires_grad_()))


def make_energy(kind="SSD", learnable=True, sobolev=True, noise=0.0, dims=(8, 9, 10), w_reg=1.8):
    torch.manual_seed(0)
    similarity = SimilarityMetric(kind, learnable=learnable).double()
    kernel = sobolev_kernel(3, 0.5, dtype=torch.float64) if sobolev else None
    return Energy(SVF(dims), similarity, w_reg, kernel, noise)


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
@pytest.mark.parametrize("sobolev", [True, False])
def test_q_v_loss_matches_its_definition(kind, sobolev):
    """(data1 + data2)/2 + (reg1 + reg2)/2 - [(ent1 + ent2)/2 + ent_closed_form], rebuilt from the same samples.

    The regulariser and the warp use the smoothed sample, the entropy the unsmoothed one (METHOD.md).
    """
    dims = (8, 9, 10)
    energy = make_energy(kind, sobolev=sobolev, dims=dims)
    fixed, moving = smooth_images(dims, batch=2, seed=5)
    fixed, moving = fixed.double(), moving.double()
    mask = torch.ones_like(fixed)
    q_v = QV.initial(2, dims, sigma_init=0.5, u_init=0.1, dtype=torch.float64)
    with torch.no_grad():
        q_v.mu.normal_(0.0, 1.0)
        fixed_features = energy.similarity.features(fixed)
    torch.manual_seed(11)
    loss, terms = energy.q_v_loss(q_v, fixed_features, moving, mask)
    torch.manual_seed(11)
    with torch.no_grad():
        v1, v2 = q_v.sample()
        data, reg, entropy = 0.0, 0.0, 0.0
        for v in (v1, v2):
            smoothed = separable_filter(v, energy.sobolev_kernel) if sobolev else v
            warped = warp(moving, energy.transformation(smoothed))
            data = data + 0.5 * energy.similarity(fixed, warped, mask)
            reg = reg + 0.5 * reg_term(smoothed, 1.8)
            entropy = entropy + 0.5 * q_v.entropy_sample_term(v)
        entropy = entropy + q_v.entropy_closed_form()
    torch.testing.assert_close(terms["data_term"], data)
    torch.testing.assert_close(terms["reg_term"], reg)
    torch.testing.assert_close(terms["entropy_term"], entropy)
    torch.testing.assert_close(loss.detach(), (data + reg - entropy).sum())


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_q_v_loss_gradients_reach_q_v_not_theta(kind):
    dims = (8, 8, 8)
    energy = make_energy(kind, noise=0.1, dims=dims)
    fixed, moving = [x.double() for x in smooth_images(dims, batch=2, seed=6)]
    mask = torch.ones_like(fixed)
    q_v = QV.initial(2, dims, sigma_init=0.5, u_init=0.1, dtype=torch.float64)
    theta = list(energy.similarity.parameters())
    with frozen(energy.similarity):
        assert not any(p.requires_grad for p in theta)
        with torch.no_grad():
            fixed_features = energy.similarity.features(fixed)
        loss, terms = energy.q_v_loss(q_v, fixed_features, moving, mask)
        loss.backward()
    assert all(p.requires_grad for p in theta)  # restored on exit
    energy.similarity.features.aggregation.weight.requires_grad_(False)
    with frozen(energy.similarity):
        pass
    assert [p.requires_grad for p in theta] == [p is not energy.similarity.features.aggregation.weight for p in theta]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) >= {"loss", "data_term", "reg_term", "entropy_term"}
    assert all(t.shape == (2,) and not t.requires_grad for t in terms.values())
    for parameter in (q_v.mu, q_v.log_var, q_v.u):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0
    assert all(p.grad is None for p in theta)


def test_learnt_lcc_window_starts_as_the_box_and_is_part_of_theta():
    """The reference's CNN_LCC window: nn.Conv3d(1, 1, 3, bias=False) weights, ones at the start, trained with theta."""
    torch.manual_seed(0)
    learnt, baseline = SimilarityMetric("LCC", learnable=True).double(), SimilarityMetric("LCC", learnable=False)
    assert baseline.window is None and list(baseline.parameters()) == []
    assert SimilarityMetric("SSD", learnable=True).window is None
    assert torch.equal(learnt.window, torch.ones(1, 1, 3, 3, 3, dtype=torch.float64))
    assert any(p is learnt.window for p in learnt.parameters())
    fixed, warped = smooth_images((10, 10, 10), batch=2, seed=4)
    fixed, warped = fixed.double(), warped.double()
    mask = torch.ones_like(fixed)
    learnt(fixed, warped, mask).sum().backward()
    assert learnt.window.grad is not None and learnt.window.grad.abs().sum() > 0
    with torch.no_grad():
        learnt.window.mul_(torch.linspace(0.5, 1.5, 27, dtype=torch.float64).view(1, 1, 3, 3, 3))
        features = learnt.features
        expected = lcc_data_term(lcc_map(features(fixed), features(warped), 1, learnt.window), mask)
        torch.testing.assert_close(learnt(fixed, warped, mask), expected)
        assert not torch.allclose(learnt(fixed, warped, mask), lcc_data_term(lcc_map(features(fixed),
                                                                                    features(warped)), mask))


@pytest.mark.parametrize("learnable", [False, True])
def test_lcc_form_option(learnable):
    fixed, warped = smooth_images((9, 9, 9), batch=1, seed=2)
    mask = torch.ones_like(fixed)
    torch.manual_seed(0)
    reference = SimilarityMetric("LCC", learnable=learnable)
    torch.manual_seed(0)
    textbook = SimilarityMetric("LCC", learnable=learnable, lcc_form="textbook")
    with torch.no_grad():
        f_fixed, f_warped = reference.features(fixed), reference.features(warped)
        # float32: the learnt window sums by convolution, the box by shifted sums
        torch.testing.assert_close(reference(fixed, warped, mask), lcc_data_term(lcc_map(f_fixed, f_warped), mask),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(textbook(fixed, warped, mask),
                                   lcc_data_term(lcc_map_textbook(f_fixed, f_warped), mask), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="centred"):
        SimilarityMetric("LCC", learnable=False, lcc_form="centred")


def test_feature_extractor_has_leaky_relu_slope_0_2():
    """Dirac-initialised f is ~x for x >= 0 and ~0.2^3 x for x < 0: three LeakyReLUs of slope 0.2 (METHOD.md),
    for the default extractor and for the one a config builds."""
    from tests.demo_config import ROOT
    from trainer.build import build_similarity
    from utils.config import load_config

    torch.manual_seed(0)
    built = build_similarity(load_config(ROOT / "configs" / "demo" / "train.json")).features
    for extractor in (FeatureExtractor(), built):
        image = torch.full((1, 1, 5, 5, 5), 0.5)
        with torch.no_grad():
            torch.testing.assert_close(extractor(image), image, rtol=0, atol=1e-4)
            torch.testing.assert_close(extractor(-image), -0.2 ** 3 * image, rtol=1e-3, atol=1e-5)
