"""Rank-1-plus-diagonal Gaussians N(mu, diag(sigma^2) + u u^T): antithetic samples and entropy terms.

Parameters are tensors of one shape (B, ...) with sigma = exp(log_var / 2); every function treats each of
the B leading entries as an independent distribution over all the remaining dimensions.
"""
from __future__ import annotations

import torch


def _per_pair(shape: torch.Size) -> tuple[int, ...]:
    return (shape[0],) + (1,) * (len(shape) - 1)


def sample_antithetic(mu: torch.Tensor, log_var: torch.Tensor, u: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised pair mu +- (sigma e + x u), e ~ N(0, I) voxelwise and x ~ N(0, 1) one scalar per pair."""
    e = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    x = torch.randn(_per_pair(mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    offset = torch.exp(0.5 * log_var) * e + x * u
    return mu + offset, mu - offset


def entropy_closed_form(log_var: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """0.5 * (log(1 + |u / sigma|^2) + sum(log_var)): the log-determinant half of the entropy, per pair (B,)."""
    u_n_sq = (u * u * torch.exp(-log_var)).flatten(1).sum(1)
    return 0.5 * (torch.log1p(u_n_sq) + log_var.flatten(1).sum(1))


def entropy_sample_term(sample: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                        u: torch.Tensor) -> torch.Tensor:
    """0.5 * (v - mu)^T Sigma^-1 (v - mu) via Sherman-Morrison, per pair (B,).

    With n = (v - mu) / sigma and u_n = u / sigma this is 0.5 * (|n|^2 - (n . u_n)^2 / (1 + |u_n|^2)).
    """
    inv_sigma = torch.exp(-0.5 * log_var)
    n = ((sample - mu) * inv_sigma).flatten(1)
    u_n = (u * inv_sigma).flatten(1)
    n_dot_u = (n * u_n).sum(1)
    return 0.5 * ((n * n).sum(1) - n_dot_u * n_dot_u / (1.0 + (u_n * u_n).sum(1)))
