"""The alignment-ranking theta loss (model/alignment.py) against its definition, hand-computed on tiny cases.

loss = mean over pairs of log(1 + sum_{c >= 1} (D_0 / D_c)^(1 / T)), D_c the data term minus its smallest value
(SSD: 1/2 sum_mask (f(F) - f(W_c))^2; LCC: sum_mask (1 - z)), W_0 = M warped by a sample of q_v and W_c by that
sample plus and minus smooth random velocity perturbations.
"""
from __future__ import annotations

import math

import pytest
import torch

from model.alignment import (AlignmentRankingLoss, candidate_velocities, dissimilarity, perturbed_warps,
                             smooth_perturbations)
from model.energy import Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QV
from tests import reference_impl as reference
from tests.demo_config import tiny_config
from tests.test_energy import recorded_step
from trainer.build import build_similarity
from trainer.monitor import TrainingMonitor
from trainer.run_folder import create_run_folder
from trainer.trainer import Trainer
from utils.config import load_config
from utils.distributed import setup

DIMS = (6, 7, 8)


def voxels(*values_at: tuple[tuple[int, int, int], float]) -> torch.Tensor:
    """A (1, 1, 2, 2, 2) float64 image, 0 except the given voxels."""
    image = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    for index, value in values_at:
        image[(0, 0, *index)] = value
    return image


def hand_made_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs of 2x2x2 images, F = 0 and three candidates each, whose SSD data terms (1/2 sum of squares in the
    mask) are, pair 1: D_0 = 0.5, D_1 = 1.0, D_2 = 2.0; pair 2: D_0 = 1.5, D_1 = 3.0, D_2 = 4.5. The voxel (1, 1, 1)
    is outside the mask, and each candidate differs from F there by 5, which must not count."""
    outside = ((1, 1, 1), 5.0)
    pair_1 = [voxels(((0, 0, 0), 1.0), outside),                                 # 1/2 * 1
              voxels(((0, 0, 0), 1.0), ((0, 0, 1), 1.0), outside),               # 1/2 * 2
              voxels(((0, 1, 0), 2.0), outside)]                                 # 1/2 * 4
    pair_2 = [voxels(((0, 0, 0), 1.0), ((0, 0, 1), 1.0), ((0, 1, 0), 1.0), outside),             # 1/2 * 3
              voxels(*[((i, j, k), 1.0) for i in (0, 1) for j in (0, 1) for k in (0, 1)
                       if (i, j, k) not in ((1, 1, 1), (1, 1, 0))], outside),                   # 1/2 * 6
              voxels(((1, 0, 0), 3.0), outside)]                                                # 1/2 * 9
    warped = torch.cat([torch.cat([pair_1[c], pair_2[c]]) for c in range(3)])  # candidate-major
    fixed = torch.zeros(2, 1, 2, 2, 2, dtype=torch.float64)
    mask = torch.ones_like(fixed)
    mask[:, :, 1, 1, 1] = 0.0
    return fixed, warped, mask


@pytest.mark.parametrize("temperature, expected", [
    (1.0, (math.log(1 + 0.5 / 1.0 + 0.5 / 2.0) + math.log(1 + 1.5 / 3.0 + 1.5 / 4.5)) / 2),
    (2.0, (math.log(1 + math.sqrt(0.5) + math.sqrt(0.25)) + math.log(1 + math.sqrt(0.5) + math.sqrt(1 / 3))) / 2),
    (0.5, (math.log(1 + 0.5 ** 2 + 0.25 ** 2) + math.log(1 + 0.5 ** 2 + (1 / 3) ** 2)) / 2)])
def test_ssd_ranking_loss_of_a_hand_made_batch(temperature, expected):
    fixed, warped, mask = hand_made_batch()
    loss = AlignmentRankingLoss(SimilarityMetric("SSD", learnable=False), temperature)(fixed, warped, mask)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_the_posterior_ranked_last_costs_more_than_ranked_first():
    """Swapping the positive with the worst candidate raises the loss: the loss prefers a low D_0."""
    fixed, warped, mask = hand_made_batch()
    loss = AlignmentRankingLoss(SimilarityMetric("SSD", learnable=False))
    swapped = torch.cat([warped[4:6], warped[2:4], warped[0:2]])
    assert float(loss(fixed, swapped, mask)) == pytest.approx(
        (math.log(1 + 2.0 / 1.0 + 2.0 / 0.5) + math.log(1 + 4.5 / 3.0 + 4.5 / 1.5)) / 2, rel=1e-12)


def perturbed_metric(kind: str) -> SimilarityMetric:
    """A learnt metric away from its Dirac initialisation (f not the identity, window not a box)."""
    torch.manual_seed(0)
    similarity = SimilarityMetric(kind, learnable=True).double()
    with torch.no_grad():
        for p in similarity.parameters():
            p.add_(0.05 * torch.randn_like(p))
            if p is similarity.window:
                p.abs_()  # positive window weights: LCC's z < 1
    return similarity


def random_batch(batch: int, candidates: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand(batch, 1, *DIMS, generator=generator, dtype=torch.float64)
    warped = torch.rand(candidates * batch, 1, *DIMS, generator=generator, dtype=torch.float64)
    mask = (torch.rand(batch, 1, *DIMS, generator=generator) > 0.3).to(torch.float64)
    return fixed, warped, mask


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_ranking_loss_of_a_learnt_metric_is_its_definition(kind):
    """Against the plain transcription of the data term (tests/reference_impl.py): SSD D = 1/2 sum_mask z, LCC
    D = sum_mask (1 - z) = data term + |mask|."""
    similarity = perturbed_metric(kind)
    batch, candidates, temperature = 2, 5, 0.7
    fixed, warped, mask = random_batch(batch, candidates)
    loss = AlignmentRankingLoss(similarity, temperature)(fixed, warped, mask)
    window = similarity.window
    total = 0.0
    for b in range(batch):
        d = []
        for c in range(candidates):
            data = reference.data_term(kind, reference.features(fixed[b:b + 1], similarity.features),
                                       reference.features(warped[c * batch + b:c * batch + b + 1], similarity.features),
                                       mask[b:b + 1], window=window)
            d.append(float(data.detach()) + (float(mask[b].sum()) if kind == "LCC" else 0.0))
        assert min(d) > 0
        total += math.log(1 + sum((d[0] / d[c]) ** (1 / temperature) for c in range(1, candidates)))
    assert float(loss.detach()) == pytest.approx(total / batch, rel=1e-10)


def test_lcc_dissimilarity_is_the_sum_of_one_minus_z_in_the_mask():
    z = torch.tensor([[0.2, 0.9, 0.5, 0.7]], dtype=torch.float64).view(1, 1, 1, 2, 2)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64).view(1, 1, 1, 2, 2)
    data_term = -(z * mask).flatten(1).sum(1)  # LCC's data term, -sum_mask z = -1.8
    d = dissimilarity("LCC", data_term, mask.flatten(1).sum(1))
    assert float(d) == pytest.approx(0.8 + 0.1 + 0.3, rel=1e-12)
    assert float(dissimilarity("SSD", torch.tensor([2.5]), torch.tensor([3.0]))) == 2.5


def test_the_ssd_loss_does_not_change_with_the_gain_of_f():
    """f -> a f (the aggregation weights times a) scales every D by a^2 and leaves the loss as it is."""
    similarity = perturbed_metric("SSD")
    fixed, warped, mask = random_batch(2, 5)
    loss = AlignmentRankingLoss(similarity)
    before = loss(fixed, warped, mask)
    with torch.no_grad():
        similarity.features.aggregation.weight.mul_(7.0)
    torch.testing.assert_close(loss(fixed, warped, mask), before, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_gradients_reach_every_parameter_of_theta(kind):
    similarity = perturbed_metric(kind)
    fixed, warped, mask = random_batch(2, 3)
    loss = AlignmentRankingLoss(similarity)
    parameters = dict(loss.named_parameters())
    assert set(parameters) == {f"similarity.{name}" for name, _ in similarity.named_parameters()}
    for name, grad in zip(parameters, torch.autograd.grad(loss(fixed, warped, mask), list(parameters.values()))):
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_the_loss_needs_two_candidates_per_pair():
    fixed, warped, mask = random_batch(2, 3)
    loss = AlignmentRankingLoss(SimilarityMetric("SSD", learnable=False))
    with pytest.raises(ValueError, match="2 or more candidates for each of 2 pairs, got 5 warps"):
        loss(fixed, warped[:5], mask)
    with pytest.raises(ValueError, match="got 2 warps"):
        loss(fixed, warped[:2], mask)


@pytest.mark.parametrize("spacing", [1, 2])
def test_perturbations_have_the_asked_rms_length_and_are_independent(spacing):
    torch.manual_seed(0)
    fields = smooth_perturbations(3, (2, 3, *DIMS), spacing=spacing, magnitude=0.7, dtype=torch.float64)
    assert fields.shape == (3, 2, 3, *DIMS)
    rms = fields.pow(2).sum(2).mean((2, 3, 4)).sqrt()
    torch.testing.assert_close(rms, torch.full((3, 2), 0.7, dtype=torch.float64), rtol=1e-12, atol=0)
    flat = fields.flatten(2).flatten(0, 1)
    correlation = torch.corrcoef(flat) - torch.eye(6, dtype=torch.float64)
    assert correlation.abs().max() < 0.9, "two perturbations coincide"


def test_perturbations_are_trilinear_between_control_points():
    """9 voxels and spacing 4: control points at 0, 4 and 8 along each axis, so the field is linear along each axis
    between them: its second differences vanish except across the middle control point."""
    torch.manual_seed(1)
    field = smooth_perturbations(1, (1, 3, 9, 9, 9), spacing=4, magnitude=1.0, dtype=torch.float64)[0, 0]
    for axis in (1, 2, 3):
        second = field.diff(n=2, dim=axis)  # index i: centred on voxel i + 1
        centred_on = torch.arange(1, 8)
        kink = (centred_on == 4)
        inside = second.index_select(axis, torch.nonzero(~kink).flatten())
        assert inside.abs().max() < 1e-12
        assert second.index_select(axis, torch.nonzero(kink).flatten()).abs().max() > 1e-3


def test_candidates_are_the_sample_then_plus_and_minus_each_perturbation():
    sample = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1).expand(2, 3, 1, 1, 1)
    perturbations = torch.tensor([10.0, 20.0, 100.0, 200.0]).view(2, 2, 1, 1, 1, 1).expand(2, 2, 3, 1, 1, 1)
    candidates = candidate_velocities(sample, perturbations)
    assert candidates.shape == (10, 3, 1, 1, 1)
    assert candidates[:, 0].flatten().tolist() == [1.0, 2.0, 11.0, 22.0, -9.0, -18.0, 101.0, 202.0, -99.0, -198.0]


def test_perturbed_warps_warp_by_the_sample_and_its_perturbations():
    """Without noise: candidate 0 is M o exp(S(v)) for v ~ q_v; the others are M o exp(S(v +- d_k)), drawn after v."""
    energy = Energy(SVF(DIMS), SimilarityMetric("SSD", learnable=False), 1.0, None, 0.0).double()
    q_v = QV.initial(2, DIMS, sigma_init=0.3, u_init=0.1, dtype=torch.float64)
    moving = torch.rand(2, 1, *DIMS, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    warped = perturbed_warps(energy, q_v, moving, no_perturbations=2, spacing=3, magnitude=0.8)
    assert warped.shape == (10, 1, *DIMS)
    torch.manual_seed(7)
    sample = q_v.sample()[0]
    fields = smooth_perturbations(2, sample.shape, 3, 0.8, dtype=torch.float64)
    for c, velocity in enumerate([sample, sample + fields[0], sample - fields[0], sample + fields[1],
                                  sample - fields[1]]):
        expected = energy.warp_moving(moving, energy.displacement(velocity), noisy=False)
        torch.testing.assert_close(warped[2 * c:2 * c + 2], expected, rtol=1e-12, atol=1e-12)


def test_train_batch_steps_theta_on_the_ranking_loss_and_leaves_q_f(tmp_path):
    """One batch with ``theta_loss`` alignment_ranking: the theta step sees the warps of 2K + 1 candidates per pair,
    theta ends where one Adam step on the recorded ranking loss takes it, and q_f, which the loss does not use,
    stays as it was."""
    config = load_config(tiny_config(tmp_path, no_iters_q_v=2),
                         ['theta_loss={"type": "alignment_ranking", "args": {"no_perturbations": 2, "spacing": 3}}'])
    context = setup("cpu")
    trainer = Trainer(config, create_run_folder(config.trainer.save_dir, config.name, "train", context), context)
    assert isinstance(trainer.theta_loss, AlignmentRankingLoss)
    trainer.monitor = TrainingMonitor(None, config, context, trainer.labels)  # train() makes it otherwise
    log: list = []
    recorded_step(trainer, log)
    trainer.train_batch(next(iter(trainer.loader)), epoch=1, index=0)
    (record,) = log
    assert record["warped"].shape[0] == 5 * record["fixed"].shape[0]  # not the contrastive step's 3 warps
    similarity = build_similarity(config)
    similarity.load_state_dict(record["model"])
    loss = AlignmentRankingLoss(similarity, config.theta_loss.alignment_ranking.temperature)
    loss(record["fixed"], record["warped"], record["mask"]).backward()
    torch.optim.Adam(similarity.parameters(), lr=config.optimizer_q_phi.args.lr).step()
    for name, value in similarity.state_dict().items():
        torch.testing.assert_close(trainer.similarity.state_dict()[name], value, rtol=1e-5, atol=1e-9, msg=name)
        if name == "features.aggregation.weight":
            assert not torch.equal(value, record["model"][name])
    for name, value in trainer.q_f.state_dict().items():
        assert torch.equal(value, record["q_f"][name]), f"q_f.{name} moved"


def test_each_perturbed_warp_draws_its_own_uniform_noise():
    """With uniform noise on, as in the paper's theta step each warp gets its own draw: no two candidates share it."""
    dims = (24, 24, 24)
    energy = Energy(SVF(dims), SimilarityMetric("SSD", learnable=False), 1.0, None, 0.1).double()
    q_v = QV.initial(1, dims, sigma_init=1e-6, u_init=0.0, dtype=torch.float64)  # phi ~ identity
    moving = torch.arange(dims[0], dtype=torch.float64).view(1, 1, -1, 1, 1).expand(1, 1, *dims).contiguous()
    torch.manual_seed(0)
    warped = perturbed_warps(energy, q_v, moving, no_perturbations=1, spacing=4, magnitude=1e-9)
    inner = (slice(None), 0, slice(2, -2), slice(2, -2), slice(2, -2))  # M(x) = x_0: the warp shows u_0 + noise_0
    noise = (warped - moving)[inner].flatten(1)
    assert noise.abs().max() <= 0.1 + 1e-6 and (noise.amax(1) > 0.099).all()
    correlation = torch.corrcoef(noise) - torch.eye(3, dtype=torch.float64)
    assert correlation.abs().max() < 0.05, "the candidates share their noise"
