"""JSON configs in the reference's ``{"type": ..., "args": {...}}`` layout, parsed into validated dataclasses.

There is one schema per kind of run, built from shared sections: q_v training (``QVTrainConfig``), q_v testing
(``QVTestConfig``), VoxelMorph training (``VxmTrainConfig``) and VoxelMorph testing (``VxmTestConfig``). The kind
is read from the file: ``model.type`` names the method (``VxmDense`` or a ``CNN_*`` metric), and the entry point
(train.py or test.py) the mode.

Every problem (unknown key, missing key, wrong type, a value out of range, a missing path) raises ``ConfigError``
naming the file and the key path. Ranges are declared with the key (``checked(gt=0)``), so a new section gets
them by declaring its fields. Relative paths resolve against the config file's folder (``data_path``,
``save_dir``, a metric checkpoint) or against ``data_path`` (``im_pairs``, ``labels``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from utils.io import name_problem, relative_path_problem


PRETRAINED_PREFIX = "pretrained:"  # a checkpoint named by the pretrained-model manifest instead of a path


class ConfigError(ValueError):
    """A config that cannot be used, with the file and key path in the message."""


MAX_DEPTH = 16  # blocks nested deeper than this are no config of ours (the deepest has 4 levels)
MAX_CONFIG_BYTES = 1 << 20  # our configs are a few kB; a larger file would be copied into every checkpoint
MAX_STRING = 4096  # the longest path most systems take (PATH_MAX)


class _Block(dict):
    """A JSON object as read, which held ``duplicates``: keys given more than once (JSON keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _block(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` of json.loads: the object, a plain dict unless it held a key twice (then marked, and
    ``check_values`` names the key)."""
    block = dict(pairs)
    if len(block) == len(pairs):
        return block
    keys = [key for key, _ in pairs]
    marked = _Block(block)
    marked.duplicates = tuple(key for key in block if keys.count(key) > 1)
    return marked


def check_values(data: Any, where: str = "") -> None:
    """Fail, naming the key path, on a number that is not finite (Infinity, NaN, 1e400 read as inf) anywhere in a
    config dict, free-form blocks included, on a key given twice in one block, on a string longer than MAX_STRING,
    or on blocks nested deeper than MAX_DEPTH; walked without recursion."""
    stack = [(data, where, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path or 'the config'}: {value!r} is not a finite number")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ConfigError(f"{path}: a string of {len(value)} characters (at most {MAX_STRING})")
        if getattr(value, "duplicates", ()):
            key = value.duplicates[0]
            raise ConfigError(f"{f'{path}.' if path else ''}{key}: the key is given more than once in its block")
        items = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ())
        if items and depth >= MAX_DEPTH:
            raise ConfigError(f"{path}: blocks nested more than {MAX_DEPTH} deep")
        for key, item in items:
            stack.append((item, f"{path}[{key}]" if isinstance(value, list) else
                          f"{path}.{key}" if path else str(key), depth + 1))


def checked(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, key: str | None = None,
            gt: float | None = None, ge: float | None = None, length: int | None = None, min_length: int | None = None,
            name: bool = False, inside: bool = False) -> Any:
    """A config key with the checks of its value, applied at load time with the key path in the message.

    ``gt`` / ``ge``: lower bounds of a number, or of every item of a list; ``length`` / ``min_length``: of a list;
    ``name``: one path component (no separator, not empty, no leading '.'); ``inside``: a relative path that
    stays inside its folder; ``key``: the JSON name when it is not an identifier.
    """
    rules = {"gt": gt, "ge": ge, "length": length, "min_length": min_length, "name": name, "inside": inside}
    metadata = {k: v for k, v in rules.items() if v is not None and v is not False}
    if key is not None:
        metadata["key"] = key
    return field(default=default, default_factory=factory, metadata=metadata)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _check_value(value: Any, rules: typing.Mapping, where: str) -> None:
    """Apply the rules of ``checked`` to a parsed value (None, an absent optional key, passes)."""
    if value is None:
        return
    if "length" in rules and len(value) != rules["length"]:
        raise ConfigError(f"{where}: expected {rules['length']} values, got {value}")
    if "min_length" in rules and len(value) < rules["min_length"]:
        raise ConfigError(f"{where}: expected at least {rules['min_length']} value(s), got {value}")
    for item in value if isinstance(value, list) else [value]:
        if "gt" in rules and not item > rules["gt"]:
            raise ConfigError(f"{where}: must be > {rules['gt']}, got {value!r}")
        if "ge" in rules and not item >= rules["ge"]:
            raise ConfigError(f"{where}: must be >= {rules['ge']}, got {value!r}")
    problem = ((rules.get("name") and name_problem(value))
               or (rules.get("inside") and relative_path_problem(value)))
    if problem:
        raise ConfigError(f"{where}: {value!r} {problem}")


@dataclass
class Section:
    """A block of the config; subclasses declare keys as fields, with ``checked(...)`` for their value checks."""

    def check(self, where: str) -> None:
        """Cross-field validation of this block; raise ConfigError mentioning ``where``."""


@dataclass
class Activation(Section):
    type: Literal["LeakyReLU"] = "LeakyReLU"
    args: dict = field(default_factory=lambda: {"negative_slope": 0.2})

    def check(self, where: str) -> None:
        if set(self.args) - {"negative_slope"}:
            raise ConfigError(f"{where}.args: only 'negative_slope' is supported, got {sorted(self.args)}")
        slope = self.args.get("negative_slope", 0.2)
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise ConfigError(f"{where}.args.negative_slope: expected a number, got {type(slope).__name__} "
                              f"{slope!r}")


@dataclass
class ModelArgs(Section):
    learnable: bool
    no_features: list[int] = checked(factory=lambda: [4, 8, 8], min_length=1, ge=1)
    activation: Activation = field(default_factory=Activation)
    s: int = checked(1, ge=1)  # LCC window (2s+1)^3
    lcc_form: Literal["reference", "textbook"] = "reference"  # LCC: the reference's form, or window-centred


@dataclass
class Model(Section):
    type: Literal["CNN_SSD", "CNN_LCC"]
    args: ModelArgs


@dataclass
class QFArgs(Section):
    sigma_init: float = checked(0.1, gt=0)
    u_init: float = checked(0.1, gt=0)
    loc_learnable: Literal[False] = False
    cov_learnable: Literal[True] = True


@dataclass
class QF(Section):
    type: Literal["LowRankMultivariateNormalDistribution"]
    args: QFArgs


@dataclass
class AlignmentRankingArgs(Section):
    """Negatives in the transformation (model/alignment.py): 2 x no_perturbations random perturbations of q_v's
    sample. The defaults of magnitude and spacing are the issue-20 pilot's (README): coarser perturbations (spacing
    2 or 4) made f blur and grow its gain as much as the contrastive step does."""

    no_perturbations: int = checked(2, ge=1)  # K: the negatives are v + d_k and v - d_k, k = 1..K
    magnitude: float = checked(0.5, gt=0)  # RMS length of each d_k, voxels of the velocity grid
    spacing: int = checked(1, ge=1)  # control points of d_k at most this many voxels apart (1: every voxel)
    temperature: float = checked(1.0, gt=0)


@dataclass
class ThetaLoss(Section):
    """The objective of the theta step: the paper's ``contrastive`` (the default, no args) or
    ``alignment_ranking``."""

    type: Literal["contrastive", "alignment_ranking"] = "contrastive"
    args: dict = field(default_factory=dict)

    def check(self, where: str) -> None:
        if self.type == "contrastive":
            if self.args:
                raise ConfigError(f"{where}.args: the contrastive theta loss takes no args, got {sorted(self.args)}")
            return
        # validated, and written back with every default filled in, so that the run folder's config shows them
        self.args = _unparse(_parse_section(AlignmentRankingArgs, self.args, f"{where}.args", Path()))

    @property
    def alignment_ranking(self) -> AlignmentRankingArgs:
        """The args of the ``alignment_ranking`` loss, typed."""
        return AlignmentRankingArgs(**self.args)


@dataclass
class NoArgs(Section):
    """The args of a block that takes none: an empty object, or none at all."""


@dataclass
class EntropyLoss(Section):
    """Kept so that the reference's files load: the entropy of q_v is the low-rank Gaussian's, always."""

    type: Literal["EntropyMultivariateNormal"]
    args: NoArgs = field(default_factory=NoArgs)


@dataclass
class RegistrationModule(Section):
    """Kept so that the reference's files load: one registration module, always."""

    type: Literal["RegistrationModule"]
    args: NoArgs = field(default_factory=NoArgs)


@dataclass
class DataLoss(Section):
    type: Literal["SSD", "LCC"]
    args: NoArgs = field(default_factory=NoArgs)


@dataclass
class RegLossArgs(Section):
    w_reg: float = checked(ge=0)
    diff_op: Literal["GradientOperator"] = "GradientOperator"


@dataclass
class RegLoss(Section):
    type: Literal["RegLoss_L2"]
    args: RegLossArgs


@dataclass
class TransformationArgs(Section):
    no_steps: int = checked(12, ge=1)
    cps: Optional[list[int]] = checked(None, length=3, ge=1)


@dataclass
class Transformation(Section):
    type: Literal["SVF_3D", "SVFFD_3D"]
    args: TransformationArgs = field(default_factory=TransformationArgs)

    def check(self, where: str) -> None:
        if self.type == "SVFFD_3D" and self.args.cps is None:
            raise ConfigError(f"{where}.args.cps: SVFFD_3D needs three positive control-point spacings")
        if self.type == "SVF_3D" and self.args.cps is not None:
            raise ConfigError(f"{where}.args.cps: only SVFFD_3D takes control-point spacings")


@dataclass
class OptimizerArgs(Section):
    lr: float = checked(gt=0)


@dataclass
class Optimizer(Section):
    type: Literal["Adam"]
    args: OptimizerArgs


@dataclass
class Demo(Section):
    no_subjects: int = checked(8, ge=2)
    size: int = checked(32, ge=8)
    seed: int = 0


@dataclass(kw_only=True)
class DataLoaderArgs(Section):
    """The pairs to register or learn from, shared by every kind of run."""

    data_path: Path
    im_pairs: str
    dims: list[int] = checked(length=3, ge=2)
    batch_size: int = checked(ge=1)
    no_workers: int = checked(0, ge=0)
    test: bool = False
    im_filename: str = checked("im.nii.gz", inside=True)  # inside each subject's folder
    mask_filename: Optional[str] = checked("mask.nii.gz", inside=True)
    seg_filename: Optional[str] = checked("seg.nii.gz", inside=True)
    labels: Optional[str] = None
    demo: Optional[Demo] = None

    def check(self, where: str) -> None:
        if self.demo is None and not self.data_path.is_dir():
            raise ConfigError(f"{where}.data_path: folder {self.data_path} does not exist")


@dataclass(kw_only=True)
class QVDataLoaderArgs(DataLoaderArgs):
    """The reference keeps the initial q_v in the data loader's block."""

    sigma_v_init: float = checked(0.5, gt=0)
    u_v_init: float = checked(0.1, gt=0)


@dataclass
class DataLoader(Section):
    type: Literal["LearnSimDataLoader"]
    args: DataLoaderArgs


@dataclass
class QVDataLoader(DataLoader):
    args: QVDataLoaderArgs


@dataclass
class Sobolev(Section):
    enabled: bool
    s: int = checked(3, ge=0)
    lambda_: float = checked(0.5, gt=0, key="lambda")


@dataclass
class UniformNoise(Section):
    enabled: bool
    magnitude: float = checked(0.1, ge=0)


@dataclass(kw_only=True)
class TrainerArgs(Section):
    """Run-folder, epoch and output keys shared by every kind of run."""

    save_dir: Path
    no_epochs: int = checked(1, ge=1)
    log_period: int = checked(64, ge=1)
    save_outputs: bool = True  # test: per-pair NIfTI images and fields on the input grid (docs/outputs.md)
    save_figures: bool = True  # test: per-pair PNG panel and per-structure box plots; train: TensorBoard images
    # train: epochs whose checkpoints are also kept in <run>/kept/ (the last epoch's stays in checkpoints/ as ever),
    # e.g. the theta budgets of a budget sweep
    keep_checkpoints: list[int] = checked(factory=list, ge=1)


@dataclass(kw_only=True)
class QVTrainerArgs(TrainerArgs):
    """Keys of q_v inference: iterations, uniform noise on the transformation, test-time samples."""

    no_iters_q_v: int = checked(ge=1)
    uniform_noise: UniformNoise
    no_samples_test: int = checked(5, ge=1)
    channels_last: bool = False  # learnt metric's convolutions on NDHWC tensors: faster on CPU (benchmarks/README.md)
    q_v_cuda_graph: bool = False  # CUDA: capture one q_v iteration in a CUDA graph and replay it (benchmarks/README.md)
    q_v_compile: bool = False  # torch.compile the q_v loss (for CUDA; benchmarks/README.md)
    # training: q_v iterations of a batch whose q_v resumes from the previous epoch's state (the CPU protocol's
    # warm start); None: no_iters_q_v every epoch, as the reference
    no_iters_q_v_warm: Optional[int] = checked(None, ge=1)
    # training: a control run in which theta and q_f stay at their initialisation (no theta/q_f step) while q_v
    # follows the same schedule: the baseline learning curve of the CPU protocol
    freeze_theta: bool = False
    # registration: coarse-to-fine q_v inference (QVPyramid, beyond the paper); None: the reference's schedule
    q_v_pyramid: Optional[QVPyramid] = None


@dataclass
class QVPyramid(Section):
    """Coarse-to-fine q_v inference (registration only, an option beyond the paper): the grid factors of the
    levels, coarse to fine and ending at 1 (the working grid); per level at most ``no_iters`` iterations (default
    trainer.no_iters_q_v), stopping once the q_v loss averaged over ``window`` iterations falls by less than
    ``tolerance`` times its magnitude from one window to the next."""

    levels: list[int] = checked(factory=lambda: [4, 2, 1], min_length=1, ge=1)
    no_iters: Optional[list[int]] = checked(None, min_length=1, ge=1)
    window: int = checked(32, ge=1)
    tolerance: float = checked(1e-3, ge=0)

    def check(self, where: str) -> None:
        if self.levels[-1] != 1 or any(a <= b for a, b in zip(self.levels, self.levels[1:])):
            raise ConfigError(f"{where}.levels: expected decreasing grid factors ending at 1, e.g. [4, 2, 1], got "
                              f"{self.levels}")
        if self.no_iters is not None and len(self.no_iters) != len(self.levels):
            raise ConfigError(f"{where}.no_iters: one count per level ({len(self.levels)}), got {self.no_iters}")


def required() -> Any:
    """A field without default: makes a key that a base schema has as optional required again."""
    return field(default=dataclasses.MISSING)


@dataclass(kw_only=True)
class RunConfig(Section):
    """What every kind of run has: a name, a seed, the data and the run folder."""

    name: str = checked(name=True)  # a folder of save_dir
    data_loader: DataLoader
    trainer: TrainerArgs
    seed: int = 0
    no_GPUs: Optional[int] = None  # kept so the reference's files load; the process count comes from torchrun
    source: str = field(default="<dict>", metadata={"internal": True})
    # read from a checkpoint, not from a file the user gave: it may not build demo data (a checkpoint must not
    # decide where anything is written)
    from_checkpoint: bool = field(default=False, metadata={"internal": True})

    method: ClassVar[str]
    mode: ClassVar[str]

    @property
    def kind(self) -> str:
        """The kind of run in words, for messages: e.g. 'VoxelMorph training config'."""
        method = "VoxelMorph" if self.method == "voxelmorph" else "q_v"
        return f"{method} {'training' if self.mode == 'train' else 'test'} config"

    def to_dict(self) -> dict:
        """JSON-serialisable dict in the file layout, paths resolved."""
        return _unparse(self)


@dataclass(kw_only=True)
class QVTestConfig(RunConfig):
    """Registration by q_v inference with a fixed metric: the reference's test configs (train keys allowed)."""

    method: ClassVar[str] = "q_v"
    mode: ClassVar[str] = "test"

    model: Model
    data_loss: DataLoss
    reg_loss: RegLoss
    transformation_module: Transformation
    optimizer_q_v: Optimizer
    data_loader: QVDataLoader
    Sobolev_grad: Sobolev
    trainer: QVTrainerArgs
    q_f: Optional[QF] = None
    optimizer_q_f: Optional[Optimizer] = None
    optimizer_q_phi: Optional[Optimizer] = None
    entropy_loss: Optional[EntropyLoss] = None
    registration_module: Optional[RegistrationModule] = None
    theta_loss: Optional[ThetaLoss] = None

    def check(self, where: str) -> None:
        if self.model.type != f"CNN_{self.data_loss.type}":
            raise ConfigError(f"{where}model.type: {self.model.type} does not match data_loss.type "
                              f"{self.data_loss.type}")
        dims = self.data_loader.args.dims
        window = 2 * self.model.args.s + 1
        if self.data_loss.type == "LCC" and window > min(dims):
            raise ConfigError(f"{where}model.args.s: the LCC window of {window} voxels does not fit "
                              f"data_loader.args.dims {dims}")
        cps = self.transformation_module.args.cps
        if cps is not None and any(c >= n for c, n in zip(cps, dims)):
            raise ConfigError(f"{where}transformation_module.args.cps: control-point spacing {cps} must be "
                              f"smaller than data_loader.args.dims {dims}")
        if self.trainer.q_v_pyramid is not None and self.transformation_module.type != "SVF_3D":
            raise ConfigError(f"{where}trainer.q_v_pyramid: coarse-to-fine inference needs the dense SVF_3D "
                              f"(an SVFFD's control points are tied to its grid)")


@dataclass(kw_only=True)
class QVTrainConfig(QVTestConfig):
    """Learning theta and q_f: the test keys plus q_f and both optimizers, with a learnable metric."""

    mode: ClassVar[str] = "train"

    q_f: QF = required()
    optimizer_q_f: Optimizer = required()
    optimizer_q_phi: Optimizer = required()
    theta_loss: ThetaLoss = field(default_factory=ThetaLoss)

    def check(self, where: str) -> None:
        super().check(where)
        if not self.model.args.learnable:
            raise ConfigError(f"{where}model.args.learnable: training needs a learnable metric")
        if self.trainer.q_v_pyramid is not None:
            raise ConfigError(f"{where}trainer.q_v_pyramid: training keeps the reference's single-resolution q_v "
                              f"schedule (the pyramid is for registration: test.py and register.py)")


@dataclass
class VxmModelArgs(Section):
    """VxmDense as in the authors' checkpoints (voxelmorph 0.1): U-Net features, integration steps, flow downsizing."""

    nb_unet_features: list[list[int]] = checked(
        factory=lambda: [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]], length=2)  # [encoder, decoder]
    int_steps: int = checked(12, ge=0)
    int_downsize: int = checked(2, ge=1)

    def check(self, where: str) -> None:
        encoder, decoder = self.nb_unet_features
        if not encoder or len(decoder) < len(encoder) or min(encoder + decoder) < 1:
            raise ConfigError(f"{where}.nb_unet_features: expected [encoder, decoder] feature counts >= 1, with at "
                              f"least as many decoder as encoder layers, got {self.nb_unet_features}")


@dataclass
class VxmModel(Section):
    """At test time the network comes from the checkpoint; ``args``, if given, are not used."""

    type: Literal["VxmDense"]
    args: Optional[VxmModelArgs] = None


@dataclass
class VxmTrainModel(VxmModel):
    args: VxmModelArgs = field(default_factory=VxmModelArgs)


@dataclass
class VxmDataLossArgs(Section):
    checkpoint: Optional[str] = None  # a learnsim metric checkpoint (path or pretrained:NAME): the learnt metric


@dataclass
class VxmDataLoss(Section):
    type: Literal["SSD", "LCC"]
    args: VxmDataLossArgs = field(default_factory=VxmDataLossArgs)


@dataclass
class VxmRegLossArgs(Section):
    w_reg: float = checked(ge=0)


@dataclass
class VxmRegLoss(Section):
    type: Literal["GradL2"]  # VoxelMorph's Grad('l2') of the flow before integration
    args: VxmRegLossArgs


@dataclass(kw_only=True)
class VxmTestConfig(RunConfig):
    """Registration by one forward pass of a VoxelMorph network; the network comes from the checkpoint."""

    method: ClassVar[str] = "voxelmorph"
    mode: ClassVar[str] = "test"

    model: VxmModel
    data_loss: Optional[VxmDataLoss] = None
    reg_loss: Optional[VxmRegLoss] = None
    optimizer: Optional[Optimizer] = None


@dataclass(kw_only=True)
class VxmTrainConfig(VxmTestConfig):
    """Training VxmDense with data_term(F, M o phi) + w_reg * GradL2(flow) as its loss."""

    mode: ClassVar[str] = "train"

    model: VxmTrainModel = required()
    data_loss: VxmDataLoss = required()
    reg_loss: VxmRegLoss = required()
    optimizer: Optimizer = required()


CONFIG_KINDS: dict[tuple[str, str], type[RunConfig]] = {
    (cls.method, cls.mode): cls for cls in (QVTrainConfig, QVTestConfig, VxmTrainConfig, VxmTestConfig)}
MODES = ("train", "test")


def config_kind(data: dict, mode: str | None = None) -> type[RunConfig]:
    """The schema of a config dict: the method from ``model.type`` (VxmDense: VoxelMorph, else q_v), the mode from
    the entry point (``mode``) or, without one, from ``data_loader.args.test``."""
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"model: expected an object, got {type(model).__name__}")
    if model is None or "type" not in model:
        raise ConfigError("model.type: missing key (CNN_SSD or CNN_LCC for q_v, VxmDense for VoxelMorph)")
    method = "voxelmorph" if model["type"] == "VxmDense" else "q_v"
    if mode is None:
        test = data.get("data_loader", {}).get("args", {}).get("test", False) if isinstance(
            data.get("data_loader"), dict) else False
        mode = "test" if test is True else "train"
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    return CONFIG_KINDS[(method, mode)]


def _unparse(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_key(f): _unparse(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("internal")}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_unparse(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _parse(tp: Any, value: Any, where: str, base: Path) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, where, base)
    if origin is Literal:
        # compare types too: 0 == False and 1 == True, but a number is not a valid boolean flag
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_section(tp, value, where, base)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_parse(args[0], v, f"{where}[{i}]", base) for i, v in enumerate(value)]
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {type(value).__name__}")
        return (base / value).resolve()
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _parse_section(cls: type, data: Any, where: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}{'.' if where else ''}{unknown[0]}: unknown key (known: {sorted(fields)})")
    values = {}
    for key, f in fields.items():
        path = f"{where}.{key}" if where else key
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: missing key")
            continue
        if f.name in ("im_pairs", "labels"):  # resolved against data_path by _resolve_data_files
            values[f.name] = data[key]
            continue
        values[f.name] = _parse(hints[f.name], data[key], path, base)
        _check_value(values[f.name], f.metadata, path)
    section = cls(**values)
    section.check(where)
    return section


def _resolve_data_files(config: RunConfig) -> None:
    """Resolve pair and label files against data_path, where the dataset looks for them."""
    args = config.data_loader.args
    for name in ("im_pairs", "labels"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"data_loader.args.{name}: expected a path string, got {type(value).__name__}")
        if value is not None:
            setattr(args, name, str((args.data_path / value).resolve()))


def _resolve_metric_checkpoint(config: RunConfig, base: Path) -> None:
    """A VoxelMorph data term's metric checkpoint resolves against the config's folder (``pretrained:NAME`` is kept)."""
    data_loss = getattr(config, "data_loss", None)
    checkpoint = getattr(getattr(data_loss, "args", None), "checkpoint", None)
    if checkpoint is not None and not checkpoint.startswith(PRETRAINED_PREFIX):
        data_loss.args.checkpoint = str((base / checkpoint).resolve())


# what a resumed run may change: how long it runs, and what it logs or writes (it stays in its own folder, so
# save_dir has no effect); any other change would make it another run than the one its checkpoint continues
RESUMABLE_KEYS = ("trainer.no_epochs", "trainer.log_period", "trainer.save_figures", "trainer.save_outputs",
                  "trainer.keep_checkpoints",
                  "trainer.no_samples_test", "trainer.save_dir", "data_loader.args.no_workers")


def changed_keys(before: dict, after: dict, where: str = "") -> list[str]:
    """Key paths whose values differ between two config dicts (a block present on one side only counts once)."""
    changed = []
    for key in sorted(set(before) | set(after), key=str):
        path = f"{where}.{key}" if where else str(key)
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_keys(old, new, path)
        elif old != new or key not in before or key not in after:
            changed.append(path)
    return changed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as JSON, else kept as a string) to a config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
        path, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        except RecursionError:
            raise ConfigError(f"override {path}: blocks nested more than {MAX_DEPTH} deep") from None
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {item!r}: {k} is not a block of the config")
            node = node[k]
        node[keys[-1]] = value
    return data


def parse_config(data: dict, base: Path, source: str = "<dict>", mode: str | None = None) -> RunConfig:
    """Validate a config dict against the schema of its kind (``config_kind``); relative paths resolve against
    ``base``."""
    try:
        check_values(data)
        kind = config_kind(data, mode)
        config = _parse_section(kind, data, "", base)
        _resolve_data_files(config)
        _resolve_metric_checkpoint(config, base)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    config.source = source
    return config


def load_config(path: str | Path, overrides: list[str] = (), mode: str | None = None) -> RunConfig:
    """Read, override and validate a JSON config file; ``mode`` 'train' or 'test' is the entry point's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"), object_pairs_hook=_block)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: blocks nested more than {MAX_DEPTH} deep") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        check_values(data)  # before the overrides copy it
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return parse_config(apply_overrides(data, list(overrides)), path.resolve().parent, str(path), mode)
