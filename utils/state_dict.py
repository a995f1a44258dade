"""Comparing a state dict with the one a module expects."""
from __future__ import annotations

import torch


def state_dict_mismatch(expected: dict[str, torch.Tensor],
                        given: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from ``given``, keys ``expected`` lacks, and keys of both whose tensor shapes differ (sorted)."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    wrong = sorted(k for k in expected if k in given and expected[k].shape != given[k].shape)
    return missing, unexpected, wrong
