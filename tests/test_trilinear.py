"""utils.trilinear and utils.native: the native CPU sampler against grid_sample, gradcheck, threads, the build and
the fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils import flow, native, sobolev, trilinear

needs_native = pytest.mark.skipif(native.native_library() is None,
                                  reason="the native trilinear sampler could not be built (no C++ compiler?)")


def grid_sample_warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """The reference: grid_sample at x + displacement, written out here (normalised, (W, H, D) order)."""
    shape = displacement.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, n, dtype=displacement.dtype) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    scale = torch.tensor([2.0 / (n - 1) for n in shape], dtype=displacement.dtype).view(1, 3, 1, 1, 1)
    grid = identity + (displacement * scale).flip(1).permute(0, 2, 3, 4, 1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def grid_sample_scaling_and_squaring(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """u <- u + u o (id + u), steps times from v / 2^steps, every composition a grid_sample (voxel units)."""
    u = velocity / 2 ** steps
    for _ in range(steps):
        u = u + grid_sample_warp(u, u)
    return u


def displacement_with_borders(shape, batch, magnitude, dtype, seed) -> torch.Tensor:
    """Random displacements (voxels) that also send samples outside the grid and exactly onto its faces: the
    cases where the border clamping and its zero gradient matter. (Inside the grid, integer positions are kinks
    of the interpolant where either one-sided derivative is right, so they are left to chance.)"""
    generator = torch.Generator().manual_seed(seed)
    d = magnitude * torch.randn((batch, 3, *shape), generator=generator, dtype=torch.float64)
    d[:, 0, 0] = 0.0  # first plane along axis 0: exactly on the face
    d[:, 0, -1] = 0.0  # last plane along axis 0: exactly on the face
    d[:, 2, :, :, 0] = -3.0  # far outside the first face of axis 2
    d[:, 1, :, -1] = 2.5  # beyond the far face of axis 1
    return d.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("channels", [1, 3])
def test_warp_matches_grid_sample_values_and_gradients(dtype, tolerance, channels):
    shape = (7, 9, 11)
    image = torch.rand((2, channels, *shape), generator=torch.Generator().manual_seed(0), dtype=dtype)
    displacement = displacement_with_borders(shape, 2, 2.0, dtype, seed=1)
    upstream = torch.randn((2, channels, *shape), generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = []
    for sampler in (trilinear.warp_border, grid_sample_warp):
        d = displacement.clone().requires_grad_()
        warped = sampler(image, d)
        results.append((warped, torch.autograd.grad((warped * upstream).sum(), d)[0]))
    (fast, fast_grad), (slow, slow_grad) = results
    torch.testing.assert_close(fast, slow, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=tolerance, atol=tolerance * slow_grad.abs().max().item())
    # the faces: zero gradient along the clamped axis where the sample sits on or beyond the face
    assert torch.all(fast_grad[:, 0, 0] == 0) and torch.all(fast_grad[:, 0, -1] == 0)
    assert torch.all(fast_grad[:, 2, :, :, 0] == 0) and torch.all(fast_grad[:, 1, :, -1] == 0)


def integrate_with_gradient(integrate, velocity, upstream, dtype):
    v = velocity.to(dtype).requires_grad_()
    u = integrate(v, 12)
    return u.double(), torch.autograd.grad((u * upstream.to(dtype)).sum(), v)[0].double()


def smooth_velocity(shape, magnitude, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """A smoothed random velocity (2, 3, *shape) in float64 and a random upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    velocity = magnitude * torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)
    velocity = F.avg_pool3d(F.pad(velocity, [1] * 6, mode="replicate"), 3, stride=1)
    return velocity, torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)


@needs_native
@pytest.mark.parametrize("shape", [(8, 9, 10), (5, 12, 3)])
def test_scaling_and_squaring_matches_grid_sample_float64(shape):
    velocity, upstream = smooth_velocity(shape, 3.0, seed=3)
    fast, fast_grad = integrate_with_gradient(trilinear.scaling_and_squaring, velocity, upstream, torch.float64)
    slow, slow_grad = integrate_with_gradient(grid_sample_scaling_and_squaring, velocity, upstream, torch.float64)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-11 * slow.abs().max().item())
    torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=1e-11 * slow_grad.abs().max().item())


@needs_native
@pytest.mark.parametrize("shape", [(8, 9, 10), (10, 12, 14)])
@pytest.mark.parametrize("magnitude", [0.3, 3.0])
def test_scaling_and_squaring_float32_round_off(shape, magnitude):
    """In float32 the flow and its gradient are as close to float64 as grid_sample's float32 ones (or closer).

    Rounding a sample point across a voxel boundary switches the one-sided derivative, so float32 results of
    both samplers differ from float64 at a few voxels; the native one takes the cell and the weight from u
    itself rather than from i + u rounded near the index i, so small displacements keep all their digits.
    """
    velocity, upstream = smooth_velocity(shape, magnitude, seed=4)
    velocity = velocity.float().double()  # the same float32 inputs for every computation
    exact, exact_grad = integrate_with_gradient(grid_sample_scaling_and_squaring, velocity, upstream, torch.float64)
    errors = []
    for integrate in (trilinear.scaling_and_squaring, grid_sample_scaling_and_squaring):
        u, grad = integrate_with_gradient(integrate, velocity, upstream, torch.float32)
        errors.append(((u - exact).abs().max(), (grad - exact_grad).abs().max()))
    (native_u, native_grad), (torch_u, torch_grad) = errors
    assert native_u <= max(torch_u, 1e-6 * exact.abs().max())
    assert native_grad <= max(torch_grad, 1e-6 * exact_grad.abs().max())


@needs_native
def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(5)
    shape = (4, 5, 6)
    velocity = (2.0 * torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: trilinear.scaling_and_squaring(v, 3), (velocity,))
    image = torch.rand((2, 2, *shape), generator=generator, dtype=torch.float64)
    displacement = (1.5 * torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: trilinear.warp_border(image, d), (displacement,))


@needs_native
def test_threads_agree_with_one_thread():
    """The scatter of the backward pass goes to per-thread buffers: the sum must not depend on the split."""
    shape = (13, 6, 7)
    generator = torch.Generator().manual_seed(6)
    velocity = 4.0 * torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)
    upstream = torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            v = velocity.clone().requires_grad_()
            u = trilinear.scaling_and_squaring(v, 12)
            results.append((u, torch.autograd.grad((u * upstream).sum(), v)[0]))
    finally:
        torch.set_num_threads(threads)
    for u, grad in results[1:]:
        torch.testing.assert_close(u, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)


@needs_native
def test_nan_coordinates_give_nan_not_a_crash():
    displacement = torch.zeros((1, 3, 4, 4, 4))
    displacement[0, 1, 2, 2, 2] = float("nan")
    warped = trilinear.warp_border(torch.rand(1, 1, 4, 4, 4), displacement)
    assert torch.isnan(warped[0, 0, 2, 2, 2]) and torch.isfinite(warped).sum() == 63
    assert torch.isnan(trilinear.scaling_and_squaring(displacement, 2)).any()


@needs_native
def test_flow_uses_the_native_sampler_on_cpu():
    velocity = torch.randn(1, 3, 5, 6, 7, requires_grad=True)
    assert "ScalingAndSquaring" in type(flow.integrate_velocity(velocity).grad_fn).__name__
    assert "Warp" in type(flow.warp(torch.rand(1, 1, 5, 6, 7), velocity).grad_fn).__name__
    # an image that needs its own gradient goes through grid_sample
    image = torch.rand(1, 1, 5, 6, 7, requires_grad=True)
    assert "GridSampler" in type(flow.warp(image, velocity).grad_fn).__name__


def conv3d_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The separable filter written as one 3D convolution with the outer-product kernel, replicate padding."""
    radius = (kernel.numel() - 1) // 2
    weight = torch.einsum("i,j,k->ijk", kernel, kernel, kernel).expand(x.shape[1], 1, -1, -1, -1)
    return F.conv3d(F.pad(x, [radius] * 6, mode="replicate"), weight, groups=x.shape[1])


@needs_native
@pytest.mark.parametrize("shape", [(9, 10, 11), (3, 5, 2), (1, 8, 16)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("kernel_kind", ["sobolev", "asymmetric"])
def test_native_separable_filter_matches_a_3d_convolution(shape, dtype, tolerance, kernel_kind):
    """Including axes shorter than the kernel, where every tap is clamped; an asymmetric kernel shows that it is
    correlated, not flipped."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((2, 3, *shape), generator=generator, dtype=torch.float64)
    kernel = (sobolev.sobolev_kernel(dtype=torch.float64) if kernel_kind == "sobolev"
              else torch.rand(5, generator=generator, dtype=torch.float64))
    assert native.usable(x.to(dtype))
    expected = conv3d_filter(x, kernel)
    torch.testing.assert_close(sobolev.separable_filter(x.to(dtype), kernel).double(), expected,
                               rtol=0, atol=tolerance * expected.abs().max().item())


def _reset(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)


@pytest.mark.parametrize("compiler", ["no-such-compiler-learnsim", "false"])
def test_fallback_when_the_kernel_cannot_be_built(monkeypatch, tmp_path, compiler):
    """No compiler, or one that fails: one warning, then grid_sample gives the same flows."""
    _reset(monkeypatch)
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("LEARNSIM_CACHE_DIR", str(tmp_path / "cache"))
    velocity = 2.0 * torch.randn(1, 3, 6, 7, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="fall back to torch"):
        assert native.native_library() is None
    assert not trilinear.usable(velocity)
    torch.testing.assert_close(flow.integrate_velocity(velocity), grid_sample_scaling_and_squaring(velocity, 12),
                               rtol=0, atol=1e-12)
    image = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(flow.warp(image, velocity), grid_sample_warp(image, velocity), rtol=0, atol=1e-12)
    kernel = sobolev.sobolev_kernel(dtype=torch.float64)
    torch.testing.assert_close(sobolev.separable_filter(velocity, kernel), conv3d_filter(velocity, kernel),
                               rtol=0, atol=1e-12)


def test_disabled_by_environment(monkeypatch):
    _reset(monkeypatch)
    monkeypatch.setenv("LEARNSIM_NATIVE", "0")
    velocity = torch.randn(1, 3, 5, 6, 7, requires_grad=True)
    assert "GridSampler" in type(flow.warp(torch.rand(1, 1, 5, 6, 7), velocity).grad_fn).__name__
    assert not trilinear.usable(velocity)


@needs_native
def test_compiled_once_into_the_cache(monkeypatch, tmp_path):
    """A second build with the same source and flags reuses the file (a fresh clone compiles once)."""
    compiler = native.find_compiler()
    first = native.compile_library(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.compile_library(compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


@needs_native
@pytest.mark.parametrize("steps", [1, 2, 12])
def test_without_gradient_the_same_flow_from_two_buffers(steps):
    """Without autograd the operator keeps two fields instead of all of them: the flow must not change."""
    velocity = 3.0 * torch.randn((2, 3, 6, 7, 8), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        light = trilinear.scaling_and_squaring(velocity, steps)
    full = trilinear.scaling_and_squaring(velocity.clone().requires_grad_(), steps)
    assert full.grad_fn is not None
    torch.testing.assert_close(light, full.detach(), rtol=0, atol=0)
    torch.testing.assert_close(light, grid_sample_scaling_and_squaring(velocity, steps), rtol=0, atol=1e-11)


def test_zero_padding_stays_on_grid_sample():
    """VoxelMorph's integration pads with zeros: the native kernel (border padding only) must not take it."""
    velocity = 4.0 * torch.randn((1, 3, 6, 7, 8), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    zeros = flow.integrate_velocity(velocity, 4, padding_mode="zeros")
    border = flow.integrate_velocity(velocity, 4)
    assert (zeros - border).abs().max() > 1e-3
