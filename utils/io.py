"""File I/O: atomic writes, advisory locks, integrity checks (gzip CRC, declared sizes, affines), one-line reasons
for refused torch files, and NIfTI reading and writing that keeps the stored geometry.

Arrays keep the NIfTI array axis order (the project's axes 0, 1, 2; see utils.grid) and the orientation exactly as
stored: nothing is ever reoriented. Every error message names the file it is about.
"""
from __future__ import annotations

import fcntl
import gzip
import io
import os
import pickle
import re
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import torch

PathLike = str | os.PathLike
KINDS = ("image", "mask", "seg")
NIFTI_CLASSES = (nib.Nifti1Image, nib.Nifti2Image)
TMP_PREFIX = ".tmp-"  # temporary files of atomic writes; a run removes stale ones from its own folder
MAX_NAME_BYTES = 255  # the longest file name of the usual file systems (ext4, XFS, APFS, NTFS in UTF-16 units)


class LockedError(ValueError):
    """A folder or output that another process is working in."""


@contextmanager
def exclusive_lock(path: PathLike, what: str) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on the file ``path`` for the duration, with this process's PID in it;
    the file is removed at the end. ``what`` names what the lock guards in the error.

    Raises LockedError naming the holder's PID while another process holds the lock. The kernel releases a lock
    when its process dies, so the lock of a killed process (its file stays) is simply taken over.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{what} is in use by another process (PID {holder}, lock {path}); wait for it to "
                              f"end or stop it") from None
        try:  # the previous holder may have removed the file after we opened it: then lock the new one
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it, so that no other process locks the removed file
        os.close(fd)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error messages."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def torch_load_problem(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line, without torch's advice to retry with
    weights_only=False (which would run whatever an untrusted file pickles)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"refused: it pickles {refused[1]}, which weights_only=True does not load"
    if "Weights only load failed" in text or isinstance(error, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return ("refused: not tensors and plain containers, which is all weights_only=True loads"
                + (f" ({detail[1].strip()})" if detail else ""))
    if isinstance(error, (IndexError, EOFError, KeyError)):  # the unpickler stumbling over bytes of another kind
        return "not a torch file (damaged, or another kind of file)"
    return first_line(error)


def name_problem(name: str) -> str | None:
    """Why ``name`` (a subject ID, a run name) cannot be one file or folder name inside our folders; None if it can.

    Names starting with '.' are refused too: '.', '..' and the temporary files of atomic writes.
    """
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name or "\0" in name:
        return "contains a path separator or NUL"
    if name.startswith("."):
        return "starts with '.'"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than a file name may be ({MAX_NAME_BYTES} bytes)"
    return None


def relative_path_problem(path: str) -> str | None:
    """Why ``path`` would leave the folder it is relative to (absolute, or through '..'); None if it stays inside."""
    if not path.strip() or "\0" in path:
        return "is empty or contains NUL"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive or path.startswith("\\"):
        return "is absolute; it must be relative to the subject's folder"
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        return "contains '..'; it must stay inside the subject's folder"
    return None


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name ends with the target's name, so writers that pick a format from the extension (nibabel's
    ``.nii.gz``) see the right one. Parent folders are created. An OSError (a full disk, no permission) names
    ``path``, the file the caller asked for.
    """
    path = Path(path)
    # not created here (mkstemp would make it 0600): the writer creates it with the usual permissions
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written file at ``path``."""
    # serialised in memory, then written by Python: torch's writer turns a full disk (ENOSPC) into a RuntimeError
    # ("unexpected pos"), even through a Python file, while Python's write raises the OSError that names it
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        handle.write(buffer.getbuffer())


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only), with clear errors for missing, corrupt or non-NIfTI files."""
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types (ImageFileError, gzip/zlib errors, EOFError, ...)
        raise ValueError(f"cannot read NIfTI file {path}: {exc}") from exc
    if not isinstance(img, NIFTI_CLASSES):
        raise ValueError(f"cannot read NIfTI file {path}: it is a {type(img).__name__}, not NIfTI")
    _check_declared_size(path, img)
    return img


def _check_declared_size(path: Path, img: nib.Nifti1Image) -> None:
    """The voxels that the header declares must be in the file, checked before anything allocates them (a 64-byte
    file may declare 1000^3 voxels). A .nii.gz file's length is the gzip trailer's (modulo 2^32)."""
    voxels = int(np.prod(img.shape, dtype=np.int64))
    # an offset of 0 in a single file means the least one, right after the header (nibabel reads it so)
    offset = max(int(img.header.get_data_offset()), int(img.header.single_vox_offset))
    expected = offset + voxels * img.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        if expected >= 1 << 32:  # the trailer holds the length modulo 2^32: no comparison possible
            return
        with path.open("rb") as handle:
            handle.seek(-4, os.SEEK_END)
            held = int.from_bytes(handle.read(4), "little")
    else:
        held = path.stat().st_size
    if held < expected:
        raise ValueError(f"{path}: the header declares {img.shape} voxels of {img.get_data_dtype()} ({expected} bytes "
                         f"with the header), but the file holds {held}: truncated, or not the image its header says")


def check_gzip(path: PathLike) -> int:
    """Read a gzip file to its end once, so that gzip checks its CRC and length: a flipped bit or a truncated stream
    fails here, naming the file, instead of loading as plausible voxels (a reader that stops at the last voxel
    never reaches the check). Returns the length of the data, in bytes."""
    length = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                length += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip data ({first_line(error)})") from None
    return length


def check_affine(affine: np.ndarray, path: PathLike) -> np.ndarray:
    """``affine`` (4, 4), unless it is no voxel-to-world map: NaN or infinite entries, or a singular 3x3 part (a zero
    voxel size, collinear axes), which no resampling and no output file could use."""
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: the voxel-to-world affine holds NaN or infinite values")
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise ValueError(f"{path}: the voxel-to-world affine is singular (a zero voxel size or collinear axes): "
                         f"{np.array2string(affine[:3], precision=3, separator=',').replace(chr(10), '')}")
    return affine


def spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3D shape of a stored shape; trailing singleton dimensions are accepted, anything else is not 3D."""
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise ValueError(f"{path}: expected a 3D image, got shape {tuple(shape)}")
    if min(shape[:3]) < 1:
        raise ValueError(f"{path}: an axis of size 0 (shape {tuple(shape)}): no voxels")
    return tuple(int(n) for n in shape[:3])


def read_nifti_header(path: PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine (4, 4) float64) of a 3D NIfTI file, reading the header only."""
    path = Path(path)
    img = _open_nifti(path)
    return spatial_shape(img.shape, path), check_affine(np.asarray(img.affine, dtype=np.float64), path)


def load_nifti(path: PathLike, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI file as (array, affine (4, 4) float64); ``kind``: image -> float32, mask -> bool, seg -> int64.

    Images must be finite; masks and segmentations must hold integer values (a mask is True where non-zero). The
    affine must be a voxel-to-world map (``check_affine``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    img = _open_nifti(path)
    shape = spatial_shape(img.shape, path)
    affine = check_affine(np.asarray(img.affine, dtype=np.float64), path)
    try:
        if kind == "image":
            array = img.get_fdata(dtype=np.float32)
        else:
            # the raw stored values (scaled only if the header asks for it): no float rounding of label ids
            array = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or corrupt data block
        raise ValueError(f"cannot read NIfTI file {path}: {exc}") from exc
    return check_voxels(np.asarray(array).reshape(shape), kind, path), affine


def check_voxels(array: np.ndarray, kind: str, path: PathLike) -> np.ndarray:
    """Check and type the voxels of an image file of ``kind``; errors name ``path``.

    image -> float32, all finite; mask -> bool (True where non-zero); seg -> int64. Masks and segmentations must
    hold integer values.
    """
    if kind == "image":
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: image contains {np.count_nonzero(~np.isfinite(array))} NaN or Inf values")
        return array

    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path}: {kind} must hold integer values, found non-integer ones")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{path}: {kind} has unsupported data type {array.dtype}")
    if kind == "mask":
        return array != 0
    return array.astype(np.int64)


def _storage_dtype(array: np.ndarray, path: Path) -> np.dtype:
    """The on-disk dtype when none is asked for: bool -> uint8 and int64 -> int32 (NIfTI readers' common ground)."""
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{path}: integer values do not fit in int32; pass dtype explicitly")
        return np.dtype(np.int32)
    return array.dtype


def save_nifti(path: PathLike, array: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor,
               dtype: np.dtype | str | None = None) -> None:
    """Write a 3D array (D, H, W) or vector image (D, H, W, C) atomically, with qform and sform = ``affine``.

    Vector images are stored 5D, (D, H, W, 1, C), with intent "vector", as the NIfTI standard asks.
    """
    path = Path(path)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be (4, 4), got {affine.shape}")
    if array.ndim not in (3, 4):
        raise ValueError(f"{path}: expected a 3D array or a (D, H, W, C) vector image, got shape {array.shape}")
    dtype = np.dtype(dtype) if dtype is not None else _storage_dtype(array, path)
    array = array.astype(dtype, copy=False)
    if array.ndim == 4:
        array = array[:, :, :, np.newaxis, :]

    img = nib.Nifti1Image(array, affine, dtype=dtype)
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    img.header.set_xyzt_units(xyz="mm")
    if array.ndim == 5:
        img.header.set_intent("vector")
    with atomic_write(path) as tmp:
        nib.save(img, tmp)
