"""Pairs of (fixed, moving) subjects from ``<data_path>/<ID>/<file>`` and a ``fixed,moving`` CSV of IDs.

Every problem that can be seen without reading voxels (missing folders or files, a malformed pairs file,
non-3D headers, mask and image shapes that disagree) is reported at construction; voxel-level problems
(NaN, empty mask, constant image) when a subject is first loaded. Messages name the file (and line).
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loader.geometry import resample_to_working, working_affine
from data_loader.images import check_integrity, read_image, read_image_header, resample_to_grid
from utils.io import PathLike, name_problem, relative_path_problem

# the 15 evaluation structures of the paper, FreeSurfer label ids (names as in the project's labels.json files)
DEFAULT_LABELS: dict[str, int] = {
    "left_thalamus": 10, "left_caudate": 11, "left_putamen": 12, "left_pallidum": 13, "brain_stem": 16,
    "left_hippocampus": 17, "left_amygdala": 18, "left_accumbens": 26,
    "right_thalamus": 49, "right_caudate": 50, "right_putamen": 51, "right_pallidum": 52,
    "right_hippocampus": 53, "right_amygdala": 54, "right_accumbens": 58,
}
AFFINE_TOLERANCE = 1e-3  # max abs difference between fixed and moving working-grid affines before we warn
# a pair ID is part of file names: "<pair>.epoch<E>.pt" and the ".tmp-<32 hex>-" of its atomic write must fit in 255
MAX_PAIR_ID_BYTES = 200


def load_labels(path: PathLike) -> dict[str, int]:
    """Read a labels JSON (structure name -> label id): a non-empty object of distinct positive integer ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse labels file {path}: {exc}") from exc
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: expected a non-empty JSON object name -> label id")
    for name, label in labels.items():
        if not name.strip():
            raise ValueError(f"{path}: empty structure name")
        if isinstance(label, bool) or not isinstance(label, int) or label <= 0:
            raise ValueError(f"{path}: label id of {name!r} must be a positive integer, got {label!r}")
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"{path}: label ids are not distinct: {labels}")
    return dict(labels)


def working_image(image: np.ndarray, input_shape: Sequence[int], dims: Sequence[int], source: object) -> np.ndarray:
    """An input-grid image (*input_shape) on the working grid (*dims), min-max rescaled to [0, 1].

    As the reference: pad and resize first, then rescale the working-grid image. ``source`` names the image in the
    error raised for a constant image.
    """
    working = resample_to_working(image, input_shape, dims, "linear")
    low, high = float(working.min()), float(working.max())
    if high <= low:
        raise ValueError(f"{source}: constant image (all voxels {low} on the working grid), cannot min-max rescale")
    return (working - low) / (high - low)


def pair_id(fixed: str, moving: str) -> str:
    """The name of a pair in file names and results: ``<fixed>_<moving>``."""
    return f"{fixed}_{moving}"


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Parse a pairs CSV: no header, one ``fixed,moving`` pair of IDs per line; blank lines are skipped.

    IDs are folder names under the data path and parts of output file names, so each must be a plain name (no
    path separator, no leading '.'); two different pairs must not share a pair ID, and no pair is listed twice (it
    would be registered twice into the same outputs, or trained on twice per epoch). A UTF-8 byte order mark is
    skipped.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    pairs, seen = [], {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2 or not all(fields):
            raise ValueError(f"{path}, line {line_no}: expected 'fixed,moving' (two IDs), got {line!r}")
        for subject in fields:
            problem = name_problem(subject)
            if problem:
                raise ValueError(f"{path}, line {line_no}: subject ID {subject!r} {problem}")
        pair = (fields[0], fields[1])
        if len(pair_id(*pair).encode("utf-8", "surrogateescape")) > MAX_PAIR_ID_BYTES:
            raise ValueError(f"{path}, line {line_no}: pair ID {pair_id(*pair)[:40]}... is longer than "
                             f"{MAX_PAIR_ID_BYTES} bytes, too long for the file names made from it")
        first = seen.setdefault(pair_id(*pair), (pair, line_no))
        if first[0] == pair and first[1] != line_no:
            raise ValueError(f"{path}, line {line_no}: pair {','.join(pair)} is listed again (first on line "
                             f"{first[1]})")
        if first[0] != pair:
            raise ValueError(f"{path}, line {line_no}: pair {','.join(pair)} has the same pair ID "
                             f"{pair_id(*pair)!r} as {','.join(first[0])} on line {first[1]}")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"pairs file {path} lists no pairs")
    return pairs


@dataclass(frozen=True)
class SubjectFiles:
    """The files of one subject and its input grid (by default the grid of the image header).

    ``file_grid`` (shape, affine) is set when the files lie on another grid than ``input_shape`` and
    ``input_affine``: their voxels are then resampled onto the input grid where the same world point lies
    (register.py puts the moving image on the fixed image's grid this way).
    """
    id: str
    im: Path
    mask: Path | None
    seg: Path | None
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    file_grid: tuple[tuple[int, int, int], np.ndarray] | None = None


class PairDataset(Dataset):
    """Image pairs on the working grid ``dims``: each item holds ``fixed`` and ``moving`` {im, mask[, seg]}.

    ``im`` is float32 (1, *dims) min-max rescaled to [0, 1] after resampling (as the reference), ``mask`` float32
    (1, *dims) of 0/1 (all ones without a mask file), ``seg`` int64 (1, *dims). ``affine`` is the working-grid
    affine of the fixed image, ``input_affine`` and ``input_shape`` its input geometry (to write outputs on the
    input grid). The voxel grids of fixed and moving images are assumed to correspond (data affinely pre-aligned).
    """

    def __init__(self, data_path: PathLike, pairs_file: PathLike, dims: Sequence[int],
                 im_filename: str = "im.nii.gz", mask_filename: str | None = "mask.nii.gz",
                 seg_filename: str | None = "seg.nii.gz", cache_size: int = 4) -> None:
        self.data_path = Path(data_path)
        if not self.data_path.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.data_path}")
        self._set_dims(dims)
        pairs_file = Path(pairs_file)
        self.pairs_file = pairs_file if pairs_file.is_absolute() else self.data_path / pairs_file
        self.pairs = read_pairs(self.pairs_file)
        for name in (im_filename, mask_filename, seg_filename):
            problem = name is not None and relative_path_problem(name)
            if problem:
                raise ValueError(f"file name {name!r} {problem}")
        self.im_filename, self.mask_filename, self.seg_filename = im_filename, mask_filename, seg_filename
        self.subjects = self._index_subjects()
        self._warn_on_affine_mismatch()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # per process (copied to workers)

    @classmethod
    def from_subjects(cls, subjects: Sequence[SubjectFiles], pairs: Sequence[tuple[str, str]],
                      dims: Sequence[int]) -> "PairDataset":
        """Pairs of subjects whose files the caller has found and checked (register.py's two images)."""
        dataset = cls.__new__(cls)
        dataset._set_dims(dims)
        dataset.subjects = {subject.id: subject for subject in subjects}
        dataset.pairs = [tuple(pair) for pair in pairs]
        dataset.cache_size = len(dataset.subjects)
        dataset._cache = OrderedDict()
        return dataset

    def _set_dims(self, dims: Sequence[int]) -> None:
        self.dims = tuple(int(n) for n in dims)
        if len(self.dims) != 3 or any(n < 2 for n in self.dims):
            raise ValueError(f"dims must be 3 sizes >= 2, got {tuple(dims)}")

    def _index_subjects(self) -> dict[str, SubjectFiles]:
        """Check that every listed file exists, passes its CRC check when compressed, and has the header of a
        consistent 3D image with a usable affine; read the geometry."""
        ids = list(dict.fromkeys(subject for pair in self.pairs for subject in pair))
        filenames = [name for name in (self.im_filename, self.mask_filename, self.seg_filename) if name]
        missing = []
        for subject in ids:
            folder = self.data_path / subject
            if not folder.is_dir():
                missing.append(folder)
                continue
            missing += [folder / name for name in filenames if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} path(s) listed by {self.pairs_file} not found:\n"
                                    + "\n".join(f"  {path}" for path in missing))

        subjects, problems = {}, []
        for subject in ids:
            folder = self.data_path / subject
            files = {key: folder / name if name else None
                     for key, name in (("im", self.im_filename), ("mask", self.mask_filename),
                                       ("seg", self.seg_filename))}
            try:
                shape, affine = read_image_header(files["im"])
                for key in ("mask", "seg"):
                    if files[key] is not None:
                        other_shape, _ = read_image_header(files[key])
                        if other_shape != shape:
                            raise ValueError(f"{files[key]}: {key} shape {other_shape} differs from image "
                                             f"shape {shape} of {files['im']}")
                for path in files.values():
                    if path is not None:
                        check_integrity(path)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            subjects[subject] = SubjectFiles(subject, files["im"], files["mask"], files["seg"], shape, affine)
        if problems:
            raise ValueError("invalid image headers:\n" + "\n".join(f"  {problem}" for problem in problems))
        return subjects

    def _warn_on_affine_mismatch(self) -> None:
        """Warn about pairs whose working grids differ in world space (the voxel grids are used as corresponding)."""
        mismatched = []
        for fixed, moving in dict.fromkeys(self.pairs):
            difference = np.abs(self.working_affine(fixed) - self.working_affine(moving)).max()
            if difference > AFFINE_TOLERANCE:
                mismatched.append(f"{fixed},{moving} (max difference {difference:.3g})")
        if mismatched:
            warnings.warn(f"{self.pairs_file}: the affines of fixed and moving images differ for "
                          f"{len(mismatched)} pair(s): {', '.join(mismatched)}; voxel grids are assumed to "
                          f"correspond, so the data must be affinely pre-aligned and resampled to one grid",
                          stacklevel=3)

    def working_affine(self, subject: str) -> np.ndarray:
        """Voxel-to-world affine (4, 4) of a subject's working grid."""
        files = self.subjects[subject]
        return working_affine(files.input_affine, files.input_shape, self.dims)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def pair_ids(self) -> list[str]:
        """The pair ID of every pair, in order."""
        return [pair_id(fixed, moving) for fixed, moving in self.pairs]

    def load_subject(self, subject: str) -> dict[str, torch.Tensor]:
        """{im, mask[, seg]} of one subject on the working grid, each (1, *dims); cached (least recently used)."""
        if subject in self._cache:
            self._cache.move_to_end(subject)
            return self._cache[subject]
        files = self.subjects[subject]
        im, _ = read_image(files.im, "image")
        file_shape = im.shape
        im = self._to_input_grid(im, files, "linear")
        loaded = {"im": working_image(im, files.input_shape, self.dims, files.im)}
        if files.mask is not None:
            mask, _ = read_image(files.mask, "mask")
            self._check_shape(mask, files.mask, file_shape, files.im)
            if not mask.any():
                raise ValueError(f"{files.mask}: empty mask (no non-zero voxel)")
            mask = self._to_input_grid(mask, files, "nearest")
            loaded["mask"] = resample_to_working(mask, files.input_shape, self.dims, "nearest").astype(np.float32)
        else:
            loaded["mask"] = np.ones(self.dims, dtype=np.float32)
        if files.seg is not None:
            seg, _ = read_image(files.seg, "seg")
            self._check_shape(seg, files.seg, file_shape, files.im)
            seg = self._to_input_grid(seg, files, "nearest")
            loaded["seg"] = resample_to_working(seg, files.input_shape, self.dims, "nearest")
        tensors = {key: torch.from_numpy(np.ascontiguousarray(value)).unsqueeze(0) for key, value in loaded.items()}

        self._cache[subject] = tensors
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tensors

    @staticmethod
    def _to_input_grid(array: np.ndarray, files: SubjectFiles, mode: str) -> np.ndarray:
        """Voxels of a file of ``files`` on the subject's input grid (unchanged unless ``file_grid`` is set)."""
        if files.file_grid is None:
            return array
        return resample_to_grid(array, files.file_grid[1], files.input_shape, files.input_affine, mode)

    @staticmethod
    def _check_shape(array: np.ndarray, path: Path, shape: tuple[int, ...], im_path: Path) -> None:
        """Voxel data must have the image's shape (the header check can be fooled by a file replaced since)."""
        if array.shape != shape:
            raise ValueError(f"{path}: shape {array.shape} differs from image shape {shape} of {im_path}")

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        fixed, moving = self.pairs[index]
        files = self.subjects[fixed]
        # clones: callers may modify the tensors in place without corrupting the cache
        return {
            "fixed": {key: value.clone() for key, value in self.load_subject(fixed).items()},
            "moving": {key: value.clone() for key, value in self.load_subject(moving).items()},
            "fixed_id": fixed,
            "moving_id": moving,
            "pair_id": pair_id(fixed, moving),
            "index": index,
            "affine": torch.from_numpy(self.working_affine(fixed)),
            "input_affine": torch.from_numpy(files.input_affine.copy()),
            "input_shape": torch.tensor(files.input_shape, dtype=torch.int64),
        }
