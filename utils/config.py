"""JSON configs in the reference's ``{"type": ..., "args": {...}}`` layout, parsed into validated dataclasses.

There is one schema per kind of run, built from shared sections: q_v training (``QVTrainConfig``), q_v testing
(``QVTestConfig``), VoxelMorph training (``VxmTrainConfig``) and VoxelMorph testing (``VxmTestConfig``). The kind
is read from the file: ``model.type`` names the method (``VxmDense`` or a ``CNN_*`` metric), and the entry point
(train.py or test.py) the mode.

Every problem (unknown key, missing key, wrong type or value, missing path) raises ``ConfigError`` naming
the file and the key path. Relative paths resolve against the config file's folder (``data_path``,
``save_dir``, a metric checkpoint) or against ``data_path`` (``im_pairs``, ``labels``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional


PRETRAINED_PREFIX = "pretrained:"  # a checkpoint named by the pretrained-model manifest instead of a path


class ConfigError(ValueError):
    """A config that cannot be used, with the file and key path in the message."""


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


@dataclass
class Section:
    """A block of the config; subclasses declare keys as fields (metadata 'key' for JSON names that aren't identifiers)."""

    def check(self, where: str) -> None:
        """Cross-field validation of this block; raise ConfigError mentioning ``where``."""


@dataclass
class Activation(Section):
    type: Literal["LeakyReLU"] = "LeakyReLU"
    args: dict = field(default_factory=lambda: {"negative_slope": 0.2})

    def check(self, where: str) -> None:
        if set(self.args) - {"negative_slope"}:
            raise ConfigError(f"{where}.args: only 'negative_slope' is supported, got {sorted(self.args)}")


@dataclass
class ModelArgs(Section):
    learnable: bool
    no_features: list[int] = field(default_factory=lambda: [4, 8, 8])
    activation: Activation = field(default_factory=Activation)
    s: int = 1


@dataclass
class Model(Section):
    type: Literal["CNN_SSD", "CNN_LCC"]
    args: ModelArgs


@dataclass
class QFArgs(Section):
    sigma_init: float = 0.1
    u_init: float = 0.1
    loc_learnable: Literal[False] = False
    cov_learnable: Literal[True] = True


@dataclass
class QF(Section):
    type: Literal["LowRankMultivariateNormalDistribution"]
    args: QFArgs


@dataclass
class TypeOnly(Section):
    type: str
    args: dict = field(default_factory=dict)


@dataclass
class DataLoss(Section):
    type: Literal["SSD", "LCC"]
    args: dict = field(default_factory=dict)


@dataclass
class RegLossArgs(Section):
    w_reg: float
    diff_op: Literal["GradientOperator"] = "GradientOperator"


@dataclass
class RegLoss(Section):
    type: Literal["RegLoss_L2"]
    args: RegLossArgs


@dataclass
class TransformationArgs(Section):
    no_steps: int = 12
    cps: Optional[list[int]] = None


@dataclass
class Transformation(Section):
    type: Literal["SVF_3D", "SVFFD_3D"]
    args: TransformationArgs = field(default_factory=TransformationArgs)

    def check(self, where: str) -> None:
        cps = self.args.cps
        if self.type == "SVFFD_3D" and (cps is None or len(cps) != 3 or min(cps) < 1):
            raise ConfigError(f"{where}.args.cps: SVFFD_3D needs three positive control-point spacings")
        if self.type == "SVF_3D" and cps is not None:
            raise ConfigError(f"{where}.args.cps: only SVFFD_3D takes control-point spacings")


@dataclass
class OptimizerArgs(Section):
    lr: float


@dataclass
class Optimizer(Section):
    type: Literal["Adam"]
    args: OptimizerArgs


@dataclass
class Demo(Section):
    no_subjects: int = 8
    size: int = 32
    seed: int = 0


@dataclass(kw_only=True)
class DataLoaderArgs(Section):
    """The pairs to register or learn from, shared by every kind of run."""

    data_path: Path
    im_pairs: str
    dims: list[int]
    batch_size: int
    no_workers: int = 0
    test: bool = False
    im_filename: str = "im.nii.gz"
    mask_filename: Optional[str] = "mask.nii.gz"
    seg_filename: Optional[str] = "seg.nii.gz"
    labels: Optional[str] = None
    demo: Optional[Demo] = None

    def check(self, where: str) -> None:
        if len(self.dims) != 3 or min(self.dims) < 2:
            raise ConfigError(f"{where}.dims: expected three sizes >= 2, got {self.dims}")
        if self.batch_size < 1 or self.no_workers < 0:
            raise ConfigError(f"{where}: batch_size must be >= 1 and no_workers >= 0")
        if self.demo is None and not self.data_path.is_dir():
            raise ConfigError(f"{where}.data_path: folder {self.data_path} does not exist")


@dataclass(kw_only=True)
class QVDataLoaderArgs(DataLoaderArgs):
    """The reference keeps the initial q_v in the data loader's block."""

    sigma_v_init: float = 0.5
    u_v_init: float = 0.1


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
    s: int = 3
    lambda_: float = field(default=0.5, metadata={"key": "lambda"})


@dataclass
class UniformNoise(Section):
    enabled: bool
    magnitude: float = 0.1


@dataclass(kw_only=True)
class TrainerArgs(Section):
    """Run-folder, epoch and output keys shared by every kind of run."""

    save_dir: Path
    no_epochs: int = 1
    log_period: int = 64
    save_outputs: bool = True  # test: per-pair NIfTI images and fields on the input grid (docs/outputs.md)
    save_figures: bool = True  # test: per-pair PNG panel and per-structure box plots; train: TensorBoard images

    def check(self, where: str) -> None:
        if min(self.no_epochs, self.log_period) < 1:
            raise ConfigError(f"{where}: no_epochs and log_period must be >= 1")


@dataclass(kw_only=True)
class QVTrainerArgs(TrainerArgs):
    """Keys of q_v inference: iterations, uniform noise on the transformation, test-time samples."""

    no_iters_q_v: int
    uniform_noise: UniformNoise
    no_samples_test: int = 5
    channels_last: bool = False  # learnt metric's convolutions on NDHWC tensors: faster on CPU (benchmarks/README.md)

    def check(self, where: str) -> None:
        if min(self.no_iters_q_v, self.no_epochs, self.no_samples_test, self.log_period) < 1:
            raise ConfigError(f"{where}: no_iters_q_v, no_epochs, no_samples_test and log_period must be >= 1")


def required() -> Any:
    """A field without default: makes a key that a base schema has as optional required again."""
    return field(default=dataclasses.MISSING)


@dataclass(kw_only=True)
class RunConfig(Section):
    """What every kind of run has: a name, a seed, the data and the run folder."""

    name: str
    data_loader: DataLoader
    trainer: TrainerArgs
    seed: int = 0
    no_GPUs: Optional[int] = None  # kept so the reference's files load; the process count comes from torchrun
    source: str = field(default="<dict>", metadata={"internal": True})

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
    entropy_loss: Optional[TypeOnly] = None
    registration_module: Optional[TypeOnly] = None

    def check(self, where: str) -> None:
        if self.model.type != f"CNN_{self.data_loss.type}":
            raise ConfigError(f"{where}model.type: {self.model.type} does not match data_loss.type "
                              f"{self.data_loss.type}")


@dataclass(kw_only=True)
class QVTrainConfig(QVTestConfig):
    """Learning theta and q_f: the test keys plus q_f and both optimizers, with a learnable metric."""

    mode: ClassVar[str] = "train"

    q_f: QF = required()
    optimizer_q_f: Optimizer = required()
    optimizer_q_phi: Optimizer = required()

    def check(self, where: str) -> None:
        super().check(where)
        if not self.model.args.learnable:
            raise ConfigError(f"{where}model.args.learnable: training needs a learnable metric")


@dataclass
class VxmModelArgs(Section):
    """VxmDense as in the authors' checkpoints (voxelmorph 0.1): U-Net features, integration steps, flow downsizing."""

    nb_unet_features: list[list[int]] = field(
        default_factory=lambda: [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]])
    int_steps: int = 12
    int_downsize: int = 2

    def check(self, where: str) -> None:
        if len(self.nb_unet_features) != 2 or self.int_steps < 0 or self.int_downsize < 1:
            raise ConfigError(f"{where}: expected nb_unet_features [encoder, decoder], int_steps >= 0 and "
                              f"int_downsize >= 1")


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
    w_reg: float


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
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return parse_config(apply_overrides(data, list(overrides)), path.resolve().parent, str(path), mode)
