"""utils.low_rank_gaussian against torch.distributions.LowRankMultivariateNormal; q_v and q_f (model.variational)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal

from model.variational import QF, QV
from utils.low_rank_gaussian import entropy_closed_form, entropy_sample_term, sample_antithetic

SHAPES = [(2, 3, 2, 2, 2), (3, 5), (1, 3, 2, 3, 1)]


def parameters(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, dtype=torch.float64, generator=generator)
    log_var = torch.randn(shape, dtype=torch.float64, generator=generator) * 0.5 - 1.0
    u = torch.randn(shape, dtype=torch.float64, generator=generator) * 0.7
    return mu, log_var, u


def reference(mu, log_var, u, i) -> LowRankMultivariateNormal:
    """torch's N(mu, diag(sigma^2) + u u^T) of pair i, flattened."""
    return LowRankMultivariateNormal(mu[i].flatten(), cov_factor=u[i].flatten()[:, None],
                                     cov_diag=torch.exp(log_var[i].flatten()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_terms_are_the_negative_log_density(shape, seed):
    mu, log_var, u = parameters(shape, seed)
    v = mu + torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    ours = entropy_closed_form(log_var, u) + entropy_sample_term(v, mu, log_var, u)
    assert ours.shape == (shape[0],)
    d = math.prod(shape[1:])
    for i in range(shape[0]):
        expected = -reference(mu, log_var, u, i).log_prob(v[i].flatten()) - 0.5 * d * math.log(2 * math.pi)
        assert ours[i].item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_is_the_entropy_up_to_a_constant(shape):
    _, log_var, u = parameters(shape, 2)
    ours = entropy_closed_form(log_var, u)
    d = math.prod(shape[1:])
    for i in range(shape[0]):
        expected = reference(torch.zeros(shape, dtype=torch.float64), log_var, u, i).entropy()
        assert ours[i].item() == pytest.approx(expected.item() - 0.5 * d * (1 + math.log(2 * math.pi)), rel=1e-12)


def test_sample_term_is_half_the_mahalanobis_distance():
    mu, log_var, u = parameters((1, 6), 3)
    v = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    covariance = torch.diag(torch.exp(log_var[0])) + torch.outer(u[0], u[0])
    diff = v[0] - mu[0]
    expected = 0.5 * diff @ torch.linalg.solve(covariance, diff)
    assert entropy_sample_term(v, mu, log_var, u).item() == pytest.approx(expected.item(), rel=1e-12)
    assert entropy_sample_term(mu, mu, log_var, u).item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_antithetic_samples_are_symmetric_about_the_mean(shape):
    mu, log_var, u = parameters(shape, 5)
    v1, v2 = sample_antithetic(mu, log_var, u, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(v1 + v2, 2 * mu, rtol=0, atol=1e-12)
    assert not torch.allclose(v1, mu)


def test_the_scalar_is_shared_within_a_pair_only():
    # with sigma ~ 0, v1 - mu = x u: the ratio is one number per pair, and differs between pairs
    shape = (4, 3, 2, 3, 2)
    mu, _, u = parameters(shape, 6)
    u = u.sign() * (u.abs() + 0.1)
    log_var = torch.full(shape, -80.0, dtype=torch.float64)
    v1, _ = sample_antithetic(mu, log_var, u, generator=torch.Generator().manual_seed(1))
    ratio = ((v1 - mu) / u).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=0)
    assert len(set(ratio[:, 0].tolist())) == shape[0]


def test_the_diagonal_noise_is_voxelwise():
    # with u = 0, v1 - mu = sigma e: independent voxels, scaled by sigma
    shape = (2000, 3)
    log_var = torch.log(torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)).expand(shape)
    v1, _ = sample_antithetic(torch.zeros(shape, dtype=torch.float64), log_var,
                              torch.zeros(shape, dtype=torch.float64), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(v1.std(0), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), rtol=0.06, atol=0)
    assert torch.corrcoef(v1.T)[0, 1].abs() < 0.1


def test_empirical_covariance_is_diagonal_plus_rank_one():
    d, n = 4, 200_000
    mu = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 0.8, 0.3], dtype=torch.float64)
    u = torch.tensor([0.7, -0.4, 0.0, 0.9], dtype=torch.float64)
    # n independent "pairs" of the same distribution over d dimensions
    v1, v2 = sample_antithetic(mu.expand(n, d), (2 * sigma.log()).expand(n, d), u.expand(n, d),
                               generator=torch.Generator().manual_seed(3))
    expected = torch.diag(sigma ** 2) + torch.outer(u, u)
    torch.testing.assert_close(v1.mean(0), mu, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(v1.T), expected, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(v2.T), expected, rtol=0, atol=0.02)


def test_gradients_flow_through_the_reparameterisation():
    mu, log_var, u = [p.requires_grad_() for p in parameters((1, 2, 3), 7)]
    v1, v2 = sample_antithetic(mu, log_var, u, generator=torch.Generator().manual_seed(0))
    (v1.square().sum() + v2.square().sum() + entropy_closed_form(log_var, u).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (mu, log_var, u))


# model.variational


@pytest.mark.parametrize("sigma_init, u_init", [(0.5, 0.1), (0.1, 0.0)])
def test_q_v_initial_values(sigma_init, u_init):
    q_v = QV.initial(2, (4, 5, 6), sigma_init=sigma_init, u_init=u_init)
    assert q_v.mu.shape == q_v.log_var.shape == q_v.u.shape == (2, 3, 4, 5, 6)
    assert torch.count_nonzero(q_v.mu) == 0
    torch.testing.assert_close(q_v.sigma, torch.full_like(q_v.mu, sigma_init))
    torch.testing.assert_close(q_v.u.detach(), torch.full_like(q_v.mu, u_init))
    assert {name for name, _ in q_v.named_parameters()} == {"mu", "log_var", "u"}


def test_q_v_state_round_trip():
    generator = torch.Generator().manual_seed(0)
    q_v = QV(*(torch.randn(3, 3, 2, 3, 4, generator=generator) for _ in range(3)))
    states = [q_v.state(i) for i in range(3)]
    for i, state in enumerate(states):
        assert set(state) == {"mu", "log_var", "u"}
        assert all(not t.requires_grad and t.shape == (3, 2, 3, 4) for t in state.values())
        torch.testing.assert_close(state["log_var"], q_v.log_var.detach()[i])
    with torch.no_grad():
        q_v.mu.add_(1.0)  # a saved state is a copy, not a view
    torch.testing.assert_close(states[0]["mu"] + 1.0, q_v.mu.detach()[0])
    restored = QV.from_states([states[2], states[0]])
    torch.testing.assert_close(restored.mu.detach(), torch.stack([states[2]["mu"], states[0]["mu"]]))
    torch.testing.assert_close(restored.u.detach()[1], q_v.u.detach()[0])
    torch.testing.assert_close(restored.log_var.detach()[0], q_v.log_var.detach()[2])
    assert all(p.requires_grad for p in restored.parameters())


def test_q_v_entropy_and_samples_use_its_parameters():
    mu, log_var, u = parameters((2, 3, 2, 2, 2), 8)
    q_v = QV(mu.clone(), log_var.clone(), u.clone())
    v1, v2 = q_v.sample()
    torch.testing.assert_close(v1 + v2, 2 * mu)
    torch.testing.assert_close(q_v.entropy_closed_form(), entropy_closed_form(log_var, u))
    torch.testing.assert_close(q_v.entropy_sample_term(v1), entropy_sample_term(v1, mu, log_var, u))


def test_q_f_initial_values_and_project_clamps():
    q_f = QF((4, 5, 6), sigma_init=0.1, u_init=0.1)
    torch.testing.assert_close(q_f.log_var.detach(), torch.full((1, 1, 4, 5, 6), 2 * math.log(0.1)))
    with torch.no_grad():
        q_f.log_var[..., 0, 0, 0] = 1.5
        q_f.log_var[..., 1, 0, 0] = -3.0
        q_f.u[..., 0, 0, 0] = 2.0
        q_f.u[..., 1, 0, 0] = -3.0
        q_f.u[..., 2, 0, 0] = 0.4
    q_f.project()
    assert q_f.log_var.max() <= 0.0 and q_f.log_var[..., 0, 0, 0] == 0.0
    assert q_f.log_var[..., 1, 0, 0] == -3.0  # values inside the bounds are kept
    assert q_f.u[..., 0, 0, 0] == 1.0 and q_f.u[..., 1, 0, 0] == -1.0
    assert q_f.u[..., 2, 0, 0].item() == pytest.approx(0.4)


def test_q_f_samples_are_antithetic_images_in_the_unit_interval():
    torch.manual_seed(0)
    shape = (6, 7, 8)
    q_f = QF(shape, sigma_init=0.3, u_init=0.2)
    fixed = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    fixed_1, fixed_2 = q_f(fixed)
    assert fixed_1.shape == fixed_2.shape == fixed.shape
    assert fixed_1.min() >= 0.0 and fixed_1.max() <= 1.0 and fixed_2.min() >= 0.0 and fixed_2.max() <= 1.0
    inside = (fixed_1 > 0) & (fixed_1 < 1) & (fixed_2 > 0) & (fixed_2 < 1)
    assert inside.float().mean() > 0.3 and (~inside).any()
    torch.testing.assert_close((fixed_1 + fixed_2)[inside], 2 * fixed[inside])
    # one sample of q_f for the whole batch: the same offset on both images where not clamped
    offset = fixed_1 - fixed
    both = inside[0] & inside[1]
    torch.testing.assert_close(offset[0][both], offset[1][both])
    # the samples are differentiable in q_f's parameters
    (fixed_1.sum() + fixed_2.square().sum()).backward()
    assert q_f.log_var.grad is not None and q_f.u.grad is not None and q_f.u.grad.abs().sum() > 0
