"""Fast trilinear sampling with border padding on the CPU: warping and fused scaling and squaring.

PyTorch's CPU kernel of 3D ``grid_sample`` is scalar code parallel over the batch only, and scaling and
squaring calls it 12 times per sample on a 3-channel field. ``trilinear.cpp`` does the same arithmetic
(``mode='bilinear'``, ``padding_mode='border'``, ``align_corners=True``, in voxel coordinates) over all
threads, with the three components of a voxel side by side, and integrates all squarings in one operator whose
backward pass reuses the stored intermediate fields (half the memory autograd keeps for 12 ``grid_sample`` calls).

The kernel is plain C++17 (no torch headers): it is compiled on first use with the system's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``, a few seconds), for the CPU at hand (``-march=native``, retried
without it where the compiler refuses), into a cache folder (``$LEARNSIM_CACHE_DIR``,
else ``$XDG_CACHE_HOME/learnsim`` or ``~/.cache/learnsim``) and loaded with ctypes. Where no compiler is found
or compilation fails, a warning is issued once and ``utils.flow`` falls back to ``grid_sample``; setting
``LEARNSIM_NATIVE=0`` selects the fallback on purpose. CUDA tensors always use ``grid_sample``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).with_name("trilinear.cpp")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
NATIVE_FLAGS = ("-march=native", "-fopenmp-simd", "-fno-trapping-math")  # vectorised loops: see trilinear.cpp
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Folder of the compiled kernel."""
    if os.environ.get("LEARNSIM_CACHE_DIR"):
        return Path(os.environ["LEARNSIM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "learnsim"


def find_compiler() -> str | None:
    """``$CXX`` if set (even if missing: then there is no compiler), else the first C++ compiler on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for path in map(shutil.which, ("c++", "g++", "clang++")) if path), None)


def cpu_signature() -> str:
    """The CPU model and feature flags (Linux), so that a cache shared by different machines keeps one build each."""
    try:
        with open("/proc/cpuinfo") as file:
            lines = [line for line in file if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def compile_library(compiler: str, folder: Path) -> Path:
    """Compile trilinear.cpp into ``folder`` unless the same build is already there; the path.

    The file name carries a hash of the source, compiler, flags, machine and CPU; it is written under a
    temporary name and renamed, so that concurrent processes never load a half-written file.
    """
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS + NATIVE_FLAGS).encode(),
                                     platform.machine().encode(), cpu_signature().encode()])).hexdigest()[:16]
    target = folder / f"trilinear-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / target.name
        for flags in (FLAGS + NATIVE_FLAGS, FLAGS):
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in _SUFFIX.values():
        for name, arguments in (
                ("svf_forward", [pointer] * 3 + [size] * 5 + [real, ctypes.c_int]),
                ("svf_backward", [pointer] * 3 + [size] * 5 + [real, ctypes.c_int]),
                ("warp_forward", [pointer] * 3 + [size] * 5 + [ctypes.c_int]),
                ("warp_backward", [pointer] * 4 + [size] * 5 + [ctypes.c_int])):
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = arguments, ctypes.c_int
    return library


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None (with one warning) when it cannot be built or is disabled."""
    global _library, _tried
    if os.environ.get("LEARNSIM_NATIVE", "1") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            compiler = find_compiler()
            if compiler is None:
                warnings.warn("no C++ compiler found ($CXX, c++, g++, clang++): trilinear sampling falls back to "
                              "torch.nn.functional.grid_sample (slower on CPU)", RuntimeWarning, stacklevel=2)
            else:
                try:
                    _library = _load(compile_library(compiler, cache_dir()))
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    warnings.warn(f"could not build the trilinear sampler ({error}); falling back to "
                                  "torch.nn.functional.grid_sample (slower on CPU)", RuntimeWarning, stacklevel=2)
        return _library


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the native kernel applies: CPU tensors of float32 or float64, and the kernel available."""
    return (all(t.device.type == "cpu" and t.dtype in _SUFFIX for t in tensors)
            and len({t.dtype for t in tensors}) == 1 and native_library() is not None)


def _threads() -> int:
    return torch.get_num_threads()


def _call(name: str, dtype: torch.dtype, *arguments) -> None:
    status = getattr(native_library(), f"{name}_{_SUFFIX[dtype]}")(*arguments)
    if status == 1:
        raise MemoryError(f"trilinear sampler: {name} could not allocate its work space")
    if status != 0:
        raise ValueError(f"trilinear sampler: {name} refused its arguments (status {status})")


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


class _ScalingAndSquaring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, velocity: torch.Tensor, no_squarings: int) -> torch.Tensor:
        velocity = velocity.contiguous()
        batch, _, *shape = velocity.shape
        history = velocity.new_empty((no_squarings, batch, *shape, 3))
        out = torch.empty_like(velocity)
        _call("svf_forward", velocity.dtype, _ptr(velocity), _ptr(history), _ptr(out), batch, *shape, no_squarings,
              2.0 ** -no_squarings, _threads())
        ctx.save_for_backward(history)
        ctx.no_squarings = no_squarings
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (history,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, _, *shape = grad_out.shape
        grad_velocity = torch.empty_like(grad_out)
        _call("svf_backward", grad_out.dtype, _ptr(history), _ptr(grad_out), _ptr(grad_velocity), batch, *shape,
              ctx.no_squarings, 2.0 ** -ctx.no_squarings, _threads())
        return grad_velocity, None


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        image, displacement = image.contiguous(), displacement.contiguous()
        batch, channels, *shape = image.shape
        out = torch.empty_like(image)
        _call("warp_forward", image.dtype, _ptr(image), _ptr(displacement), _ptr(out), batch, channels, *shape,
              _threads())
        ctx.save_for_backward(image, displacement)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        image, displacement = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, channels, *shape = image.shape
        grad_displacement = torch.empty_like(displacement)
        _call("warp_backward", image.dtype, _ptr(image), _ptr(displacement), _ptr(grad_out), _ptr(grad_displacement),
              batch, channels, *shape, _threads())
        return None, grad_displacement


def scaling_and_squaring(velocity: torch.Tensor, no_squarings: int) -> torch.Tensor:
    """Displacement of exp(v) in voxel units; velocity (B, 3, D, H, W), voxel units (CPU, when ``usable``)."""
    if no_squarings < 1:
        raise ValueError(f"scaling_and_squaring: no_squarings must be >= 1, got {no_squarings}")
    return _ScalingAndSquaring.apply(velocity, no_squarings)


def warp_border(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """image (B, C, D, H, W) sampled trilinearly at x + displacement(x) (B, 3, D, H, W, voxel units), border padding.

    Differentiable with respect to the displacement only: the caller uses ``grid_sample`` when the image needs a
    gradient.
    """
    return _Warp.apply(image, displacement)
