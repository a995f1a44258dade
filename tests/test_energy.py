"""The theta/q_f step (model.energy.ContrastiveLoss, Energy.sample_warped, Trainer.train_batch) against METHOD.md.

loss = [E(F, M o phi_0) - (E(F1, M o phi_1) + E(F2, M o phi_2)) / 2] / batch, with F1, F2 = clamp(F +- (sigma e + x u))
an antithetic pair from q_f and phi_k = id + u + noise_k, three independent draws of U(-a, a) noise (the reference
warps M once per energy term). Both theta and q_f step on this loss. Everything expected here is transcribed from
METHOD.md in this file or in tests/reference_impl.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from model.energy import ContrastiveLoss, Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QF, QV
from tests import reference_impl as reference
from tests.demo_config import tiny_config
from trainer.build import build_similarity
from trainer.monitor import TrainingMonitor
from trainer.run_folder import create_run_folder
from trainer.trainer import Trainer
from utils.config import load_config
from utils.distributed import setup

DIMS = (8, 9, 10)
BATCH = 2
NOISE = 0.1  # voxels, the reference's uniform_noise magnitude


def images(seed: int, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand(batch, 1, *DIMS, generator=generator, dtype=torch.float64)
    warped = torch.rand(3 * batch, 1, *DIMS, generator=generator, dtype=torch.float64)
    mask = (torch.rand(batch, 1, *DIMS, generator=generator) > 0.3).to(torch.float64)
    return fixed, warped, mask


def perturbed_metric(kind: str) -> SimilarityMetric:
    """A learnt metric away from its Dirac initialisation (f not the identity, window not a box)."""
    torch.manual_seed(0)
    similarity = SimilarityMetric(kind, learnable=True).double()
    with torch.no_grad():
        for p in similarity.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return similarity


def q_f_with_spread() -> QF:
    q_f = QF(DIMS, sigma_init=0.1, u_init=0.1).double()
    with torch.no_grad():
        q_f.log_var.add_(0.2 * torch.randn_like(q_f.log_var))
        q_f.u.add_(0.05 * torch.randn_like(q_f.u))
    return q_f


def energy_of(similarity: SimilarityMetric, fixed, warped, mask) -> torch.Tensor:
    """E per pair by the plain transcription: data term of f(F), f(M o phi) (SSD 0.5 sum, LCC -sum, in the mask)."""
    window = None if similarity.window is None else similarity.window
    return reference.data_term(similarity.kind, reference.features(fixed, similarity.features),
                               reference.features(warped, similarity.features), mask, window=window)


def expected_contrastive_loss(similarity: SimilarityMetric, q_f: QF, fixed, warped, mask) -> torch.Tensor:
    """The definition, drawing e then x (one scalar) from the global generator as q_f does."""
    sigma = torch.exp(0.5 * q_f.log_var.clamp(max=0.0))
    u = q_f.u.clamp(-1.0, 1.0)
    e = torch.randn(q_f.log_var.shape, dtype=fixed.dtype)
    x = torch.randn((1, 1, 1, 1, 1), dtype=fixed.dtype)
    offset = sigma * e + x * u
    fixed_1, fixed_2 = (fixed + offset).clamp(0.0, 1.0), (fixed - offset).clamp(0.0, 1.0)
    warped_0, warped_1, warped_2 = warped.chunk(3)
    total = 0.0
    for b in range(fixed.shape[0]):
        one = slice(b, b + 1)
        real = energy_of(similarity, fixed[one], warped_0[one], mask[one])
        sampled = (energy_of(similarity, fixed_1[one], warped_1[one], mask[one])
                   + energy_of(similarity, fixed_2[one], warped_2[one], mask[one]))
        total = total + real - sampled / 2.0
    return (total / fixed.shape[0]).squeeze()


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
@pytest.mark.parametrize("batch", [1, 3])
def test_contrastive_loss_is_its_definition(kind, batch):
    similarity, q_f = perturbed_metric(kind), q_f_with_spread()
    fixed, warped, mask = images(1, batch)
    contrastive = ContrastiveLoss(similarity, q_f)
    torch.manual_seed(5)
    loss = contrastive(fixed, warped, mask)
    torch.manual_seed(5)
    expected = expected_contrastive_loss(similarity, q_f, fixed, warped, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert abs(expected) > 1e-3  # not trivially zero: a wrong sign or batch factor shows


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_contrastive_gradients_reach_theta_the_window_and_q_f(kind):
    similarity, q_f = perturbed_metric(kind), q_f_with_spread()
    fixed, warped, mask = images(2)
    contrastive = ContrastiveLoss(similarity, q_f)
    torch.manual_seed(6)
    loss = contrastive(fixed, warped, mask)
    parameters = dict(contrastive.named_parameters())
    grads = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
    torch.manual_seed(6)
    expected = expected_contrastive_loss(similarity, q_f, fixed, warped, mask)
    expected_grads = torch.autograd.grad(expected, list(parameters.values()))
    for (name, grad), expected_grad in zip(grads.items(), expected_grads):
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12, msg=name)
    assert ("similarity.window" in grads) == (kind == "LCC")


def linear_moving(dims=DIMS) -> torch.Tensor:
    """M(x) = x_0 (the voxel index along axis 0): trilinear warping is exact, M o (id + u)(x) = x_0 + u_0(x)."""
    return torch.arange(dims[0], dtype=torch.float64).view(1, 1, -1, 1, 1).expand(1, 1, *dims).contiguous()


def test_theta_step_warps_three_times_with_independent_uniform_noise():
    dims = (24, 24, 24)
    energy = Energy(SVF(dims), SimilarityMetric("SSD", learnable=False), 1.0, None, NOISE).double()
    q_v = QV.initial(1, dims, sigma_init=1e-6, u_init=0.0, dtype=torch.float64)  # phi ~ identity
    torch.manual_seed(0)
    warped = energy.sample_warped(q_v, linear_moving(dims))
    assert warped.shape == (3, 1, *dims)
    inner = (slice(None), 0, slice(2, -2), slice(2, -2), slice(2, -2))  # the noise never reaches the border
    noise = (warped - linear_moving(dims))[inner].flatten(1)  # u_0 + noise_0, u_0 ~ 0
    # U(-a, a): bounded by a, mean 0, variance a^2 / 3, nearly reaching both ends
    assert noise.abs().max() <= NOISE + 1e-6
    assert (noise.amax(1) > 0.99 * NOISE).all() and (noise.amin(1) < -0.99 * NOISE).all()
    torch.testing.assert_close(noise.var(1), torch.full((3,), NOISE ** 2 / 3, dtype=torch.float64), rtol=0.05, atol=0)
    assert noise.mean(1).abs().max() < 0.01 * NOISE
    correlation = torch.corrcoef(noise)
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 0.05, "the terms share their noise"


def test_theta_step_without_noise_warps_identically():
    energy = Energy(SVF(DIMS), SimilarityMetric("SSD", learnable=False), 1.0, None, 0.0).double()
    q_v = QV.initial(2, DIMS, sigma_init=0.5, u_init=0.1, dtype=torch.float64)
    warped = energy.sample_warped(q_v, torch.rand(2, 1, *DIMS, dtype=torch.float64))
    first, second, third = warped.chunk(3)
    assert torch.equal(first, second) and torch.equal(first, third)


def recorded_step(trainer: Trainer, log: list) -> None:
    """Wrap the trainer's theta/q_f step: record its inputs, the random state and the parameters before it."""
    step = trainer.step_module

    def recording(fixed, warped, mask):
        log.append({"fixed": fixed.clone(), "warped": warped.clone(), "mask": mask.clone(),
                    "rng": torch.get_rng_state(), "model": copy.deepcopy(trainer.similarity.state_dict()),
                    "q_f": copy.deepcopy(trainer.q_f.state_dict())})
        return step(fixed, warped, mask)

    trainer.step_module = recording


def replayed_gradients(config, record: dict) -> tuple[ContrastiveLoss, list[torch.Tensor]]:
    """The contrastive module at the recorded parameters and its gradients on the recorded inputs."""
    similarity = build_similarity(config)
    similarity.load_state_dict(record["model"])
    q_f = QF(config.data_loader.args.dims)
    q_f.load_state_dict(record["q_f"])
    contrastive = ContrastiveLoss(similarity, q_f)
    torch.set_rng_state(record["rng"])
    loss = contrastive(record["fixed"], record["warped"], record["mask"])
    return contrastive, list(torch.autograd.grad(loss, list(contrastive.parameters()), allow_unused=True))


def adam_step(module: torch.nn.Module, gradients: list[torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Parameters after one step of fresh Adams (theta and q_f learning rates) with the given gradients."""
    module = copy.deepcopy(module)
    optimizers = [torch.optim.Adam(module.similarity.parameters(), lr=config.optimizer_q_phi.args.lr),
                  torch.optim.Adam(module.q_f.parameters(), lr=config.optimizer_q_f.args.lr)]
    for parameter, gradient in zip(module.parameters(), gradients):
        parameter.grad = gradient
    for optimizer in optimizers:
        optimizer.step()
    return {name: p.detach() for name, p in module.named_parameters()}


def test_train_batch_steps_theta_and_q_f_on_the_contrastive_loss(tmp_path):
    """One batch: theta and q_f end exactly where one Adam step on the recorded contrastive loss takes them."""
    config = load_config(tiny_config(tmp_path, no_iters_q_v=2))
    context = setup("cpu")
    trainer = Trainer(config, create_run_folder(config.trainer.save_dir, config.name, "train", context), context)
    trainer.monitor = TrainingMonitor(None, config, context, trainer.labels)  # train() makes it otherwise
    log: list = []
    recorded_step(trainer, log)
    trainer.train_batch(next(iter(trainer.loader)), epoch=1, index=0)
    assert len(log) == 1
    assert log[0]["warped"].shape[0] == 3 * log[0]["fixed"].shape[0]
    contrastive, gradients = replayed_gradients(config, log[0])
    expected = adam_step(contrastive, gradients, config)
    actual = dict(trainer.theta_loss.named_parameters())
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].detach(), value, rtol=1e-5, atol=1e-9, msg=name)
    before = {**{f"similarity.{k}": v for k, v in log[0]["model"].items()},
              **{f"q_f.{k}": v for k, v in log[0]["q_f"].items()}}
    moved = {name for name in actual if not torch.equal(actual[name].detach(), before[name])}
    assert {"q_f.log_var", "q_f.u", "similarity.features.aggregation.weight"} <= moved


def linear_ssd_metric(negative_slope: float) -> SimilarityMetric:
    """A learnt SSD metric with generic weights (negative taps and biases included): with slope 1 f is affine."""
    torch.manual_seed(3)
    similarity = SimilarityMetric("SSD", learnable=True, negative_slope=negative_slope).double()
    with torch.no_grad():
        for p in similarity.parameters():
            p.copy_(torch.randn_like(p))
    return similarity


def contrastive_without_noise(similarity: SimilarityMetric, q_f: QF, fixed, moving, mask, seed: int):
    """ContrastiveLoss with the three warps identical (uniform noise off) and the q_f offset e it drew."""
    torch.manual_seed(seed)
    fixed_1, _ = q_f(fixed)
    torch.manual_seed(seed)
    loss = ContrastiveLoss(similarity, q_f)(fixed, moving.repeat(3, 1, 1, 1, 1), mask)
    return loss, (fixed_1 - fixed).detach()


def antithetic_identity(similarity: SimilarityMetric, offset, mask) -> torch.Tensor:
    """-1/2 sum_mask (f(e) - f(0))^2: the linear part of an affine f applied to q_f's offset e, per pair, averaged
    over the batch (the contrastive loss's division by the batch)."""
    with torch.no_grad():
        linear = similarity.features(offset) - similarity.features(torch.zeros_like(offset))
    return (-0.5 * (linear ** 2 * mask).flatten(1).sum(1)).mean()


def fixed_inside_the_unit_interval(batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """F in [0.4, 0.6] and a mask: q_f's offsets (sigma 0.01, |u| 0.01) never reach the [0, 1] clamp."""
    generator = torch.Generator().manual_seed(11)
    fixed = 0.4 + 0.2 * torch.rand(batch, 1, *DIMS, generator=generator, dtype=torch.float64)
    mask = (torch.rand(batch, 1, *DIMS, generator=generator) > 0.3).to(torch.float64)
    return fixed, mask


@pytest.mark.parametrize("moving_kind", ["aligned", "unrelated"])
def test_ssd_contrastive_loss_of_a_linear_f_is_minus_half_the_features_of_the_noise(moving_kind):
    """METHOD.md's property: SSD, linear f (LeakyReLU slope 1), no noise, no clamping: E(F) - (E(F+e) + E(F-e))/2 =
    -1/2 sum_mask f(e)^2, whatever M. So the SSD theta step cannot reward alignment; it can only grow f's response
    to q_f's noise."""
    similarity, q_f = linear_ssd_metric(1.0), QF(DIMS, sigma_init=0.01, u_init=0.01).double()
    fixed, mask = fixed_inside_the_unit_interval()
    generator = torch.Generator().manual_seed(12)
    moving = fixed.clone() if moving_kind == "aligned" else torch.rand(fixed.shape, generator=generator,
                                                                        dtype=torch.float64)
    loss, offset = contrastive_without_noise(similarity, q_f, fixed, moving, mask, seed=4)
    assert float(offset.abs().max()) < 0.2  # the clamp to [0, 1] was not active
    expected = antithetic_identity(similarity, offset, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    assert float(expected) < -1e-3


def test_the_leaky_relu_and_the_clamp_make_the_ssd_step_depend_on_the_images():
    """With the reference's slope 0.2, or with F at the edges of [0, 1] where q_f's samples are clamped, the
    contrastive loss is no longer -1/2 sum f(e)^2, and it differs between an aligned and an unrelated M."""
    fixed, mask = fixed_inside_the_unit_interval()
    generator = torch.Generator().manual_seed(12)
    unrelated = torch.rand(fixed.shape, generator=generator, dtype=torch.float64)

    def losses(similarity, q_f, fixed):
        aligned, offset = contrastive_without_noise(similarity, q_f, fixed, fixed.clone(), mask, seed=4)
        other, _ = contrastive_without_noise(similarity, q_f, fixed, unrelated, mask, seed=4)
        return aligned, other, antithetic_identity(similarity, offset, mask)

    small_q_f = QF(DIMS, sigma_init=0.01, u_init=0.01).double()
    aligned, other, identity = losses(linear_ssd_metric(0.2), small_q_f, fixed)  # LeakyReLU: f not linear
    assert abs(float(aligned - identity)) > 1e-3 * abs(float(identity))
    assert abs(float(aligned - other)) > 1e-3 * abs(float(aligned))

    edges = (fixed > 0.5).to(torch.float64)  # a binary F: half its voxels at 1, half at 0, where the clamp acts
    aligned, other, identity = losses(linear_ssd_metric(1.0), QF(DIMS, sigma_init=0.1, u_init=0.1).double(), edges)
    assert abs(float(aligned - identity)) > 1e-3 * abs(float(identity))
    assert abs(float(aligned - other)) > 1e-3 * abs(float(aligned))
