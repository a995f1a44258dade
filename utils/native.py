"""The CPU kernels of the project (trilinear sampling, separable filtering): built on first use, loaded with ctypes.

The kernels are plain C++17 without torch headers (``trilinear.cpp``, ``separable.cpp`` beside this file), so
that building them takes seconds: they are compiled on first use with the system's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) for the CPU at hand (``-march=native`` and vectorisation flags, retried without them
where the compiler refuses) into a cache folder (``$LEARNSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/learnsim`` or
``~/.cache/learnsim``), once per source, compiler and CPU. Where no compiler is found or the build fails, one
warning is issued and the callers fall back to their torch implementations; ``LEARNSIM_NATIVE=0`` chooses the
fallback on purpose. CUDA tensors always take the torch path.
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

SOURCES = (Path(__file__).with_name("trilinear.cpp"), Path(__file__).with_name("separable.cpp"))
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
# the loops over x are written for the vectoriser, which needs -fno-trapping-math to vectorise floor()
NATIVE_FLAGS = ("-march=native", "-fopenmp-simd", "-fno-trapping-math")
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_SIGNATURES = {  # name: argument types, each function exists as name_f32 and name_f64 and returns an int status
    "svf_forward": ["p"] * 3 + ["i"] * 5 + ["d", "t", "t"],
    "svf_backward": ["p"] * 3 + ["i"] * 5 + ["d", "t"],
    "warp_forward": ["p"] * 3 + ["i"] * 5 + ["t"],
    "warp_backward": ["p"] * 4 + ["i"] * 5 + ["t"],
    "separable_filter_axis": ["p"] * 2 + ["i"] * 3 + ["p", "i", "t"],
}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Folder of the compiled kernels."""
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
    """Compile the sources into ``folder`` unless the same build is already there; the path.

    The file name carries a hash of the sources, compiler, flags, machine and CPU; it is written under a
    temporary name and renamed, so that concurrent processes never load a half-written file.
    """
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES), compiler.encode(),
                                     " ".join(FLAGS + NATIVE_FLAGS).encode(), platform.machine().encode(),
                                     cpu_signature().encode()])).hexdigest()[:16]
    target = folder / f"learnsim-kernels-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / target.name
        for flags in (FLAGS + NATIVE_FLAGS, FLAGS):
            done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed on {', '.join(map(str, SOURCES))}:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    types = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "d": ctypes.c_double, "t": ctypes.c_int}
    for name, arguments in _SIGNATURES.items():
        for suffix in SUFFIX.values():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = [types[a] for a in arguments], ctypes.c_int
    return library


def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (with one warning) when they cannot be built or are disabled."""
    global _library, _tried
    if os.environ.get("LEARNSIM_NATIVE", "1") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            compiler = find_compiler()
            if compiler is None:
                warnings.warn("no C++ compiler found ($CXX, c++, g++, clang++): trilinear sampling and Sobolev "
                              "filtering fall back to torch (slower on CPU)", RuntimeWarning, stacklevel=2)
            else:
                try:
                    _library = _load(compile_library(compiler, cache_dir()))
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    warnings.warn(f"could not build the CPU kernels ({error}); trilinear sampling and Sobolev "
                                  "filtering fall back to torch (slower on CPU)", RuntimeWarning, stacklevel=2)
        return _library


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels apply: CPU tensors of one dtype, float32 or float64, and the kernels available."""
    return (all(t.device.type == "cpu" and t.dtype in SUFFIX for t in tensors)
            and len({t.dtype for t in tensors}) == 1 and native_library() is not None)


def call(name: str, dtype: torch.dtype, *arguments) -> None:
    """Call kernel ``name`` for ``dtype`` with raw arguments (pointers as ints); the thread count goes last."""
    status = getattr(native_library(), f"{name}_{SUFFIX[dtype]}")(*arguments, torch.get_num_threads())
    if status == 1:
        raise MemoryError(f"native kernel {name} could not allocate its work space")
    if status != 0:
        raise ValueError(f"native kernel {name} refused its arguments (status {status})")
