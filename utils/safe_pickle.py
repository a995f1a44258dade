"""Reading torch files that ``weights_only=True`` refuses, without running anything they name.

The authors' learnt-metric checkpoints pickle a live object (their ConfigParser), so ``torch.load`` with
``weights_only=True`` cannot read them. ``restricted_torch_load`` reads them with an unpickler whose globals come
from an explicit allow-list (containers, torch's tensor rebuilders, dtypes); every other global the file names
becomes an ``InertObject`` subclass that only records the arguments and state the pickle hands it. A pickle that
names ``os.system`` gets an inert ``posix.system`` stub called with a string: no command runs, no module is imported.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
from typing import Any

import torch



def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """torch's tensor rebuilder, for a real storage and without hooks (a hook would be code to call later)."""
    if not isinstance(storage, torch.storage.TypedStorage) or backward_hooks:
        raise pickle.UnpicklingError("refused: a tensor without a torch storage, or with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """torch's parameter rebuilder, for a tensor and without hooks."""
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise pickle.UnpicklingError("refused: a parameter that is not a tensor, or with backward hooks")
    return torch.nn.Parameter(data, requires_grad)


# the only globals resolved to real objects: what state dicts, optimizer states and plain configs are made of
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): getattr(torch, name) for name in ("float16", "float32", "float64", "bfloat16", "int8",
                                                          "int16", "int32", "int64", "uint8", "bool")},
}


class InertObject:
    """Stands for an object of a class outside the allow-list: keeps what the pickle gives it and runs nothing."""

    module: str = ""
    qualname: str = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.qualname}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS; any other global becomes an inert stub class."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        return type(name if name.isidentifier() else "Stub", (InertObject,), {"module": module, "qualname": name})


def _load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# what torch.load needs of a pickle module: torch subclasses its Unpickler and calls its load
RESTRICTED_PICKLE = types.SimpleNamespace(__name__=__name__, Unpickler=RestrictedUnpickler, load=_load)


def restricted_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` through RestrictedUnpickler: tensors and containers as usual, anything else inert."""
    # weights_only=False only because torch.load accepts a custom pickle module on that path alone; the
    # module's find_class is the allow-list above, stricter than weights_only about what may run
    return torch.load(path, map_location=map_location, pickle_module=RESTRICTED_PICKLE, weights_only=False)


def find_inert(obj: Any, where: str = "") -> list[str]:
    """Paths (e.g. ``config.state._config``) of the InertObjects inside nested dicts, lists and tuples."""
    if isinstance(obj, InertObject):
        return [where or "."]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in find_inert(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in find_inert(v, f"{where}[{i}]")]
    return []
