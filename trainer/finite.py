"""Finite or stop: a loss, parameter or transformation that becomes NaN or infinite stops the run with one line
naming the pair(s), the step and the term, so that it is never saved or reported as a result; a loss that grows by
orders of magnitude is worth a warning.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

# the q_v terms in the order they are named when several go non-finite in one iteration: a component before the
# loss that sums them
TERMS = ("data_term", "reg_term", "entropy_term", "loss")
CUDA_CHECK_PERIOD = 64  # iterations between two reads of the flags on CUDA (a read waits for the GPU)
DIVERGENCE_FACTOR = 1e4  # a loss this many times larger (in magnitude) than its first value is reported


class NonFiniteError(ValueError):
    """A loss, parameter or transformation that is NaN or infinite."""


def describe_pairs(names: Sequence[str]) -> str:
    """'pair A' or 'pairs A, B', for messages."""
    return f"pair{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _pairs(indices: Iterable[int], pair_ids: Sequence[str] | None) -> str:
    """Pairs of a batch by ID (by index without IDs), for messages."""
    return describe_pairs([pair_ids[i] if pair_ids is not None else f"#{i}" for i in indices])


class FiniteWatch:
    """Watches the per-pair terms of an optimisation loop (``TERMS``, each (B,)) for NaN and infinities.

    On CUDA, the first non-finite iteration of each (term, pair) is recorded on the device, without waiting for
    it, and the record is read every ``period`` iterations (default ``CUDA_CHECK_PERIOD``) and by ``check``. On the
    CPU, where reading costs nothing (default ``period`` 1), the loss is read every iteration and the terms only once
    it is not finite (a non-finite term makes the loss, their sum, non-finite). ``what`` names the loop; ``hint``
    says what to try, and ``start_hint`` what gave a non-finite term in the first iteration, before any step.
    """

    def __init__(self, what: str, pair_ids: Sequence[str] | None = None, hint: str = "", start_hint: str = "",
                 period: int | None = None):
        self.what, self.pair_ids, self.hint, self.start_hint, self.period = what, pair_ids, hint, start_hint, period
        self.first: torch.Tensor | None = None  # (terms, B): first non-finite iteration, 0 while finite

    def update(self, iteration: int, terms: Mapping[str, torch.Tensor]) -> None:
        """Record the terms of ``iteration`` (counted from 1); raise NonFiniteError when it is time to read."""
        period = self.period or (CUDA_CHECK_PERIOD if terms["loss"].device.type == "cuda" else 1)
        if period == 1 and bool(torch.isfinite(terms["loss"]).all()):
            return
        nonfinite = ~torch.isfinite(torch.stack([terms[key].detach().reshape(-1) for key in TERMS]))
        if self.first is None:
            self.first = torch.zeros(nonfinite.shape, dtype=torch.long, device=nonfinite.device)
        self.first = torch.where(nonfinite & (self.first == 0), iteration, self.first)
        if iteration % period == 0:
            self.check()

    def check(self) -> None:
        """Raise NonFiniteError naming the earliest non-finite iteration, its term and its pairs, if any."""
        if self.first is None or not bool(self.first.any()):
            return
        first = self.first.cpu()
        iteration = int(first[first > 0].min())
        term = next(t for t, row in enumerate(first) if (row == iteration).any())
        pairs = (first[term] == iteration).nonzero().flatten().tolist()
        raise NonFiniteError(f"{self.what}: the {TERMS[term].replace('_', ' ')} of {_pairs(pairs, self.pair_ids)} "
                             f"became NaN or infinite at iteration {iteration}"
                             f"{self.start_hint if iteration == 1 else self.hint}")


def check_pairs_finite(tensors: Mapping[str, torch.Tensor], what: str, pair_ids: Sequence[str] | None = None,
                       hint: str = "") -> None:
    """Raise NonFiniteError unless every pair's slice of every tensor (B, ...) is finite; one read of the device."""
    names = list(tensors)
    finite = torch.stack([torch.isfinite(tensors[name].detach().flatten(1)).all(1) for name in names]).cpu()
    if bool(finite.all()):
        return
    row = next(k for k, flags in enumerate(finite) if not flags.all())
    pairs = (~finite[row]).nonzero().flatten().tolist()
    raise NonFiniteError(f"{what}: {names[row]} of {_pairs(pairs, pair_ids)} is NaN or infinite{hint}")


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module`` holding NaN or infinities; one read of the device."""
    named = list(module.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    return [name for (name, _), ok in zip(named, finite) if not ok]


class DivergenceGuard:
    """Says when a logged loss has grown by orders of magnitude: once per key, beyond ``DIVERGENCE_FACTOR`` times
    the magnitude of its first value."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.reported: set[str] = set()

    def __call__(self, values: Mapping[str, float]) -> list[str]:
        """Messages for the keys of ``values`` (finite floats) that have diverged since their first value."""
        messages = []
        for key, value in values.items():
            first = self.first.setdefault(key, abs(value))
            if key not in self.reported and first > 0 and abs(value) > DIVERGENCE_FACTOR * first:
                self.reported.add(key)
                messages.append(f"{key} is {value:.3g}, more than {DIVERGENCE_FACTOR:.0e} times its first value "
                                f"{first:.3g}: the run may be diverging (is a learning rate too large?)")
        return messages


def first_nonfinite(values: Mapping[str, float]) -> str | None:
    """The key of the first non-finite value (a term before the loss that sums it), or None."""
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    return next((key for key in bad if not key.endswith("/loss")), bad[0] if bad else None)
