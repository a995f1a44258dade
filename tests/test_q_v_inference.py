"""trainer.q_v_inference on the GPU: no host synchronisation in the loop, CUDA graphs, torch.compile, and the
CUDA sampler (grid_sample) against the CPU one. The CPU tests check that the GPU-only options change nothing there.
"""
from __future__ import annotations

import math

import pytest
import torch

from model.energy import Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF
from model.variational import QV
from trainer.q_v_inference import fit_q_v
from utils.flow import integrate_velocity, warp
from utils.sobolev import sobolev_kernel

DIMS = (12, 14, 16)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem(device: str, kind: str = "LCC", learnt: bool = True, seed: int = 0):
    """A small registration problem: energy, initial q_v and smooth fixed / moving images with a mask."""
    torch.manual_seed(seed)
    similarity = SimilarityMetric(kind, learnable=learnt)
    energy = Energy(SVF(DIMS), similarity, w_reg=1.0, sobolev_kernel=sobolev_kernel(), noise_magnitude=0.1)
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.avg_pool3d(torch.rand((2, 1, *[n + 4 for n in DIMS]), generator=generator), 5,
                                            stride=1)
    fixed, moving = images[:1], images[1:]
    mask = torch.ones_like(fixed)
    q_v = QV.initial(1, DIMS, 0.5, 0.1)
    return (energy.to(device), q_v.to(device), fixed.to(device), moving.to(device), mask.to(device))


def test_gpu_options_are_ignored_on_cpu():
    """cuda_graph asks for nothing on the CPU: the same iterations, the same result."""
    results = []
    for cuda_graph in (False, True):
        energy, q_v, fixed, moving, mask = problem("cpu")
        torch.manual_seed(1)
        fit_q_v(energy, q_v, fixed, moving, mask, no_iters=5, lr=0.05, cuda_graph=cuda_graph)
        results.append(q_v.mu.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@needs_cuda
@pytest.mark.gpu
def test_q_v_loop_has_no_host_synchronisation():
    energy, q_v, fixed, moving, mask = problem("cuda")
    fit_q_v(energy, q_v, fixed, moving, mask, no_iters=2, lr=0.05)  # caches (identity grids) filled, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fit_q_v(energy, q_v, fixed, moving, mask, no_iters=5, lr=0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def data_term_of_mean(energy: Energy, q_v: QV, fixed, moving, mask) -> float:
    """The data term of the posterior-mean transformation (deterministic, unlike the loss of an iteration)."""
    with torch.no_grad():
        warped = warp(moving, energy.transformation(energy.smooth(q_v.mu)))
        features = energy.similarity.features
        return energy.similarity.data_term_from_features(features(fixed), features(warped), mask).sum().item()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind,learnt", [("SSD", False), ("LCC", True)])
def test_cuda_graph_reproduces_and_converges_like_eager(kind, learnt):
    """A replayed iteration does what an eager one does: seeded runs repeat exactly, and after 60 iterations the
    posterior mean has improved the data term as much as the eager loop's (the two may draw their random numbers
    in different orders, so the comparison is of the progress, not of the numbers)."""
    means, data = [], []
    for cuda_graph in (True, True, False):
        energy, q_v, fixed, moving, mask = problem("cuda", kind, learnt)
        initial = data_term_of_mean(energy, q_v, fixed, moving, mask)
        torch.manual_seed(3)
        fit_q_v(energy, q_v, fixed, moving, mask, no_iters=60, lr=0.05, cuda_graph=cuda_graph)
        means.append(q_v.mu.detach().clone())
        data.append(data_term_of_mean(energy, q_v, fixed, moving, mask))
    torch.testing.assert_close(means[0], means[1], rtol=0, atol=0)
    assert math.isfinite(data[0]) and abs(data[0] - data[2]) <= 0.1 * abs(initial - data[2])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_q_v_loss_runs_and_lowers_the_loss():
    energy, q_v, fixed, moving, mask = problem("cuda", "SSD", False)
    torch.manual_seed(4)
    first = fit_q_v(energy, q_v, fixed, moving, mask, no_iters=1, lr=0.05, compile_loss=True)["loss"].item()
    last = fit_q_v(energy, q_v, fixed, moving, mask, no_iters=40, lr=0.05, compile_loss=True)["loss"].item()
    assert last < first


@needs_cuda
@pytest.mark.gpu
def test_cuda_sampling_matches_the_cpu_sampler():
    """On CUDA, warping and scaling and squaring go through grid_sample; on the CPU through the native kernel."""
    generator = torch.Generator().manual_seed(5)
    velocity = 3.0 * torch.randn((2, 3, *DIMS), generator=generator, dtype=torch.float64)
    image = torch.rand((2, 1, *DIMS), generator=generator, dtype=torch.float64)
    upstream = torch.randn((2, 1, *DIMS), generator=generator, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        v = velocity.to(device).requires_grad_()
        warped = warp(image.to(device), integrate_velocity(v))
        results.append((warped.cpu(), torch.autograd.grad((warped * upstream.to(device)).sum(), v)[0].cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-8)
