"""q_v inference for a batch of pairs: no_iters_q_v Adam steps on the q_v loss, theta fixed.

``infer_q_v`` is the one sequence that training, testing and the benchmarks run for a batch. With
``trainer.q_v_pyramid`` (an option beyond the paper, for registration only) it runs coarse to fine instead: q_v is
inferred on each level of an image pyramid, started from the previous level's posterior, and each level stops
early once the q_v loss stops improving (``LossPlateau``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from model.energy import Energy
from model.variational import Q_V_KEYS, QV
from trainer.finite import FiniteWatch, check_pairs_finite
from utils.config import QVPyramid, QVTestConfig
from utils.pyramid import downsample_image, downsample_mask, level_shapes


@contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats (|x| < 1.2e-38 in float32) to zero on the CPU for the duration; restore the mode after.

    The backward pass of scaling and squaring spreads the data-term gradient from the mask into the
    zero-gradient region with products of small trilinear weights, which produces many subnormal numbers,
    and the CPU handles those in slow microcode: flushing them makes a q_v iteration 1.3x (baseline metric) to
    1.7x (learnt metric) faster on CPU at 64^3 (benchmarks/README.md).
    Numbers this small are far below the float32 round-off of every quantity they are added to.
    """
    if not enabled:
        yield
        return
    was_on = _flush_denormal_is_on()
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported and not was_on:
            torch.set_flush_denormal(False)


def _flush_denormal_is_on() -> bool:
    """Whether the CPU flushes subnormals now (torch has a setter but no getter)."""
    return (torch.tensor([1e-30]) * 1e-10).item() == 0.0


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Turn off gradients of a module's parameters for the duration (theta during the q_v iterations)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def fit_q_v(energy: Energy, q_v: QV, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor,
            no_iters: int, lr: float, progress: bool = False, log_period: int = 0,
            log=None, flush_denormal: bool = True, cuda_graph: bool = False,
            compile_loss: bool = False, converged: Callable[[int, dict[str, torch.Tensor]], bool] | None = None,
            pair_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Optimise q_v in place; returns the per-pair terms of the last iteration.

    As in the reference, Adam is created anew for every batch. ``log(iteration, terms)`` is called every
    ``log_period`` iterations (never when 0), so logging stays off the hot loop; nothing else in the loop waits
    for the GPU. ``flush_denormal``: see ``denormals_flushed`` (CPU tensors only). ``cuda_graph`` (CUDA only)
    replays one captured iteration (see ``_graphed_iteration``); ``compile_loss`` runs the q_v loss through
    ``torch.compile`` (meant for CUDA: on the CPU the native sampler is opaque to it). ``converged(iteration,
    terms)``, when given, is asked after every iteration whether to stop before ``no_iters``.
    """
    use_graph = cuda_graph and moving.device.type == "cuda"
    # fused: one pass over each parameter instead of a dozen element-wise ones (5x faster on CPU, same update to
    # round-off); a captured step needs the capturable variant
    optimizer = (torch.optim.Adam(q_v.parameters(), lr=lr, foreach=True, capturable=True) if use_graph
                 else torch.optim.Adam(q_v.parameters(), lr=lr, fused=True))
    with frozen(energy.similarity), torch.no_grad():
        fixed_features = energy.similarity.features(fixed)
    loss_function = torch.compile(energy.q_v_loss) if compile_loss else energy.q_v_loss

    def iteration_step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        loss, step_terms = loss_function(q_v, fixed_features, moving, mask)
        loss.backward()
        optimizer.step()
        return step_terms

    step = _graphed_iteration(iteration_step) if use_graph else iteration_step
    hint = f" (is optimizer_q_v.args.lr {lr:g} too large?)"
    watch = FiniteWatch("q_v inference", pair_ids, hint, ", before any step of q_v: the metric (theta) or the "
                                                         "images give it")
    terms: dict[str, torch.Tensor] = {}
    with frozen(energy.similarity), denormals_flushed(flush_denormal and moving.device.type == "cpu"):
        # disable=None: a progress bar only when stderr is a terminal (no cursor codes in redirected logs)
        for iteration in tqdm(range(1, no_iters + 1), desc="q_v", leave=False, disable=None if progress else True):
            terms = step()
            watch.update(iteration, terms)
            if log is not None and log_period and iteration % log_period == 0:
                log(iteration, terms)
            if converged is not None and converged(iteration, terms):
                break
    watch.check()
    check_pairs_finite({f"q_v's {key}": getattr(q_v, key) for key in Q_V_KEYS}, "q_v inference", pair_ids, hint)
    return {k: t.clone() for k, t in terms.items()} if use_graph else terms


def infer_q_v(energy: Energy, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor,
              config: QVTestConfig, states: Sequence[dict[str, torch.Tensor] | None] | None = None,
              progress: bool = False, no_iters: int | None = None, **fit_options) -> tuple[QV, dict[str, torch.Tensor]]:
    """q_v inference for a batch of pairs: start each pair from its saved state (None, or no ``states``: the
    initial q_v of the config), then ``trainer.no_iters_q_v`` (or ``no_iters``) iterations at ``optimizer_q_v``'s lr.

    Images (B, 1, *dims) on the device of the run. Returns q_v and the per-pair terms of the last iteration; the
    caller saves q_v's states or samples from it. ``fit_options``: see ``fit_q_v``. With ``trainer.q_v_pyramid``
    and no saved state, ``infer_q_v_pyramid`` runs instead.
    """
    args = config.data_loader.args
    shape = energy.transformation.velocity_shape
    batch = moving.shape[0]
    fresh = states is None or all(state is None for state in states)
    if fresh and config.trainer.q_v_pyramid is not None:
        return infer_q_v_pyramid(energy, fixed, moving, mask, config, progress=progress, **fit_options)[:2]
    if fresh:
        q_v = QV.initial(batch, shape, args.sigma_v_init, args.u_v_init, moving.device)
    else:
        initial = QV.initial(1, shape, args.sigma_v_init, args.u_v_init).state(0)
        q_v = QV.from_states([initial if state is None else state for state in states], moving.device)
    no_iters = config.trainer.no_iters_q_v if no_iters is None else no_iters
    fit_options = {"cuda_graph": config.trainer.q_v_cuda_graph, "compile_loss": config.trainer.q_v_compile,
                   **fit_options}
    terms = fit_q_v(energy, q_v, fixed, moving, mask, no_iters, config.optimizer_q_v.args.lr, progress=progress,
                    **fit_options)
    return q_v, terms


class LossPlateau:
    """A convergence test for ``fit_q_v``: true once the q_v loss (summed over the batch), averaged over windows of
    ``window`` iterations, falls by less than ``tolerance`` times its magnitude from one window to the next.

    The loss is summed on its device and read once per window, so the test does not stall a GPU. ``iterations``
    is the number of iterations seen.
    """

    def __init__(self, window: int, tolerance: float):
        self.window, self.tolerance = int(window), float(tolerance)
        self.total: torch.Tensor | None = None
        self.previous: float | None = None
        self.iterations = 0

    def __call__(self, iteration: int, terms: dict[str, torch.Tensor]) -> bool:
        self.iterations = iteration
        loss = terms["loss"].sum()
        self.total = loss if self.total is None else self.total + loss
        if iteration % self.window:
            return False
        mean, self.total = self.total.item() / self.window, None
        previous, self.previous = self.previous, mean
        return previous is not None and previous - mean < self.tolerance * abs(previous)


def infer_q_v_pyramid(energy: Energy, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor,
                      config: QVTestConfig, progress: bool = False, **fit_options
                      ) -> tuple[QV, dict[str, torch.Tensor], list[dict]]:
    """Coarse-to-fine q_v inference from the initial q_v (``trainer.q_v_pyramid``; SVF only).

    Level by level (the factors of ``levels``, coarse to fine, on grids of ``utils.pyramid.level_shapes``): the
    images are blurred and downsampled to the level's grid, q_v starts from the initial q_v on the coarsest level
    and from the previous level's q_v resized (``QV.resized``: velocities scale with the grid) on the others, and
    Adam runs at ``optimizer_q_v``'s lr until ``LossPlateau(window, tolerance)`` says the loss has stopped falling,
    or for at most the level's ``no_iters`` (default ``trainer.no_iters_q_v``). Returns q_v on the working grid, the
    terms of its last iteration, and per level {shape, iterations}.
    """
    pyramid: QVPyramid = config.trainer.q_v_pyramid
    args = config.data_loader.args
    dims = tuple(fixed.shape[2:])
    limits = pyramid.no_iters or [config.trainer.no_iters_q_v] * len(pyramid.levels)
    shapes = level_shapes(dims, pyramid.levels)
    limits = limits[len(limits) - len(shapes):]  # the limits of the levels kept (the finest ones)
    fit_options = {"cuda_graph": config.trainer.q_v_cuda_graph, "compile_loss": config.trainer.q_v_compile,
                   **fit_options}
    q_v, terms, levels = None, {}, []
    for shape, limit in zip(shapes, limits):
        level_energy = energy if shape == dims else energy.on_grid(shape)
        if q_v is None:
            q_v = QV.initial(moving.shape[0], shape, args.sigma_v_init, args.u_v_init, moving.device)
        else:
            q_v = q_v.resized(shape)
        plateau = LossPlateau(pyramid.window, pyramid.tolerance)
        terms = fit_q_v(level_energy, q_v, downsample_image(fixed, shape), downsample_image(moving, shape),
                        downsample_mask(mask, shape), limit, config.optimizer_q_v.args.lr, progress=progress,
                        converged=plateau, **fit_options)
        levels.append({"shape": list(shape), "iterations": plateau.iterations})
    return q_v, terms, levels


def _graphed_iteration(step: Callable[[], dict[str, torch.Tensor]],
                       warmup: int = 3) -> Callable[[], dict[str, torch.Tensor]]:
    """``step`` (one whole q_v iteration: loss, backward, Adam) as a CUDA graph after ``warmup`` eager calls.

    Every call performs exactly one iteration: the first ``warmup`` run eagerly on a side stream (as CUDA graph
    capture requires), the next captures the iteration and replays it, later ones replay it. The inputs are
    static (q_v's parameters are updated in place; f(F), M and the mask do not change) and the graph draws its
    own random numbers from the default CUDA generator. The returned terms are the graph's output tensors,
    overwritten by the next replay.
    """
    state: dict = {"calls": 0, "graph": None, "terms": None}
    side = torch.cuda.Stream()

    def run() -> dict[str, torch.Tensor]:
        state["calls"] += 1
        if state["calls"] <= warmup:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*")  # the eager warm-up steps
                terms = step()
            torch.cuda.current_stream().wait_stream(side)
            return terms
        if state["graph"] is None:
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["terms"] = step()
        state["graph"].replay()
        return state["terms"]

    return run
