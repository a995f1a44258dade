"""JSON configs in the reference's ``{"type": ..., "args": {...}}`` layout, parsed into validated dataclasses.

Every problem (unknown key, missing key, wrong type or value, missing path) raises ``ConfigError`` naming
the file and the key path. Relative paths resolve against the config file's folder (``data_path``,
``save_dir``) or against ``data_path`` (``im_pairs``, ``labels``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


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


@dataclass
class DataLoaderArgs(Section):
    data_path: Path
    im_pairs: str
    dims: list[int]
    batch_size: int
    sigma_v_init: float = 0.5
    u_v_init: float = 0.1
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


@dataclass
class DataLoader(Section):
    type: Literal["LearnSimDataLoader"]
    args: DataLoaderArgs


@dataclass
class Sobolev(Section):
    enabled: bool
    s: int = 3
    lambda_: float = field(default=0.5, metadata={"key": "lambda"})


@dataclass
class UniformNoise(Section):
    enabled: bool
    magnitude: float = 0.1


@dataclass
class TrainerArgs(Section):
    no_iters_q_v: int
    save_dir: Path
    uniform_noise: UniformNoise
    no_epochs: int = 1
    no_samples_test: int = 5
    log_period: int = 64
    channels_last: bool = False  # learnt metric's convolutions on NDHWC tensors: faster on CPU (benchmarks/README.md)
    save_outputs: bool = True  # test: per-pair NIfTI images and fields on the input grid (docs/outputs.md)
    save_figures: bool = True  # test: per-pair PNG panel and per-structure box plots; train: TensorBoard images

    def check(self, where: str) -> None:
        if min(self.no_iters_q_v, self.no_epochs, self.no_samples_test, self.log_period) < 1:
            raise ConfigError(f"{where}: no_iters_q_v, no_epochs, no_samples_test and log_period must be >= 1")


@dataclass
class Config(Section):
    """A whole run: what the reference's JSON files hold, plus the data layout keys of this project."""

    name: str
    model: Model
    data_loss: DataLoss
    reg_loss: RegLoss
    transformation_module: Transformation
    optimizer_q_v: Optimizer
    data_loader: DataLoader
    Sobolev_grad: Sobolev
    trainer: TrainerArgs
    q_f: Optional[QF] = None
    optimizer_q_f: Optional[Optimizer] = None
    optimizer_q_phi: Optional[Optimizer] = None
    entropy_loss: Optional[TypeOnly] = None
    registration_module: Optional[TypeOnly] = None
    no_GPUs: Optional[int] = None  # kept so the reference's files load; the process count comes from torchrun
    seed: int = 0
    source: str = field(default="<dict>", metadata={"internal": True})

    def check(self, where: str) -> None:
        if self.model.type != f"CNN_{self.data_loss.type}":
            raise ConfigError(f"{where}model.type: {self.model.type} does not match data_loss.type "
                              f"{self.data_loss.type}")

    def require_training(self) -> None:
        """Fail unless the keys that only training needs are present and the metric is learnable."""
        for key in ("q_f", "optimizer_q_f", "optimizer_q_phi"):
            if getattr(self, key) is None:
                raise ConfigError(f"{self.source}: {key}: missing key, required for training")
        if not self.model.args.learnable:
            raise ConfigError(f"{self.source}: model.args.learnable: training needs a learnable metric")

    def to_dict(self) -> dict:
        """JSON-serialisable dict in the file layout, paths resolved."""
        return _unparse(self)


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


def _resolve_data_files(config: Config) -> None:
    """Resolve pair and label files against data_path, where the dataset looks for them."""
    args = config.data_loader.args
    for name in ("im_pairs", "labels"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"data_loader.args.{name}: expected a path string, got {type(value).__name__}")
        if value is not None:
            setattr(args, name, str((args.data_path / value).resolve()))


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


def parse_config(data: dict, base: Path, source: str = "<dict>") -> Config:
    """Validate a config dict; relative paths resolve against ``base``."""
    try:
        config = _parse_section(Config, data, "", base)
        _resolve_data_files(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    config.source = source
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override and validate a JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return parse_config(apply_overrides(data, list(overrides)), path.resolve().parent, str(path))
