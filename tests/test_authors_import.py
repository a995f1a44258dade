"""The authors' learnt metrics import into our checkpoint format, and nothing in their pickles ever runs."""
from __future__ import annotations

import collections
import os
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from trainer.authors_import import import_authors_metric
from trainer.checkpoint import CheckpointError, load_checkpoint, similarity_from_checkpoint
from utils.safe_pickle import restricted_torch_load

SHAPE = (8, 8, 8)


def authors_layout(image: torch.Tensor) -> torch.Tensor:
    """Our (1, 1, i, j, k) image as the reference's loader made its tensors from the same file: SimpleITK's array
    (k, j, i) of the image, then torch.flipud of the flattened tensor (base_dataset.py, biobank_dataset.py)."""
    array = sitk.GetArrayFromImage(sitk.GetImageFromArray(image[0, 0].numpy().transpose(2, 1, 0)))
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return torch.flipud(tensor.reshape(-1)).reshape(tensor.shape)[None, None]


class Marker:
    """Pickles as a call of os.system that would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def authors_state(kind: str, no_features=(4, 8, 8), seed=0) -> dict:
    """A reference-style model state dict, random (not Dirac) so that a wrong key mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    state, channels = collections.OrderedDict(), [1, *no_features]
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        state[f"enc.enc.{i}.main.weight"] = torch.randn(c_out, c_in, 3, 3, 3, generator=generator) * 0.3
        state[f"enc.enc.{i}.main.bias"] = torch.randn(c_out, generator=generator) * 0.1
    state["agg.weight"] = torch.rand(1, channels[-1], 1, generator=generator)
    if kind == "LCC":
        state["kernel.weight"] = 1 + 0.2 * torch.rand(1, 1, 3, 3, 3, generator=generator)
    return state


def write_authors_checkpoint(path, kind="LCC", config=None, model_state=None, q_f_state=None, **changes):
    """A file of the pytorch-template kind: a pickled ConfigParser object, state dicts and both optimizers."""
    module = types.ModuleType("parse_config")

    class ConfigParser:  # stands for the reference's class; pickled by reference to parse_config.ConfigParser
        def __init__(self, config):
            self._config, self.rank, self.test = config, 0, False

    ConfigParser.__module__, ConfigParser.__qualname__ = module.__name__, "ConfigParser"
    module.ConfigParser = ConfigParser
    model = authors_state(kind) if model_state is None else model_state
    params = [torch.nn.Parameter(v) for v in model.values()]
    q_f = q_f_state if q_f_state is not None else collections.OrderedDict(
        mu=torch.rand(1, 1, *SHAPE), log_var=torch.full((1, 1, *SHAPE), -4.0), u=torch.full((1, 1, *SHAPE), 0.05))
    optimizer_q_phi = torch.optim.Adam(params)
    optimizer_q_f = torch.optim.Adam([torch.nn.Parameter(v) for v in q_f.values()])
    if config is None:
        config = collections.OrderedDict(name=f"learnsim_{kind}", model={
            "type": f"CNN_{kind}", "args": {"learnable": True, "no_features": [4, 8, 8],
                                            "activation": {"type": "LeakyReLU", "args": {"negative_slope": 0.2}}}})
    sys.modules[module.__name__] = module
    try:
        torch.save({"epoch": 50, "step": 13500, "config": ConfigParser(config), "q_f": q_f, "model": model,
                    "optimizer_q_f": optimizer_q_f.state_dict(), "optimizer_q_phi": optimizer_q_phi.state_dict(),
                    **changes}, path)
    finally:
        del sys.modules[module.__name__]
    return path, model, q_f


def reference_data_term(state: dict, kind: str, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """A transcription of the reference's learnt metric: replicate-padded convs, LeakyReLU(0.2), 1x1 aggregation,
    then 0.5 sum (f(F) - f(M))^2 or -sum of its LCC with the learnt window (METHOD.md)."""
    def features(x):
        for i in range(3):
            x = F.leaky_relu(F.conv3d(F.pad(x, [1] * 6, mode="replicate"), state[f"enc.enc.{i}.main.weight"],
                                      state[f"enc.enc.{i}.main.bias"]), 0.2)
        n, c = x.shape[:2]
        return F.conv1d(x.view(n, c, -1), state["agg.weight"]).view(n, 1, *x.shape[2:])

    f, m = features(fixed), features(warped)
    if kind == "SSD":
        return 0.5 * ((f - m) ** 2).sum()

    def window(x):
        return F.conv3d(F.pad(x, [1] * 6, mode="replicate"), state["kernel.weight"])

    u_f, u_m = window(f) / 27.0, window(m) / 27.0
    cross = window((f - u_f) * (m - u_m))
    var_f, var_m = window((f - u_f) ** 2), window((m - u_m) ** 2)
    return -(cross * cross / (var_f * var_m + 1e-5)).sum()


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_import_gives_the_reference_metric(tmp_path, kind):
    source, model, q_f = write_authors_checkpoint(tmp_path / f"checkpoint_{kind}.pt", kind)
    with pytest.raises(CheckpointError, match=f"{source}: refused: it pickles parse_config.ConfigParser"):
        load_checkpoint(source)  # why the restricted unpickler is needed
    destination = import_authors_metric(source, tmp_path / "imported.pt")
    checkpoint = load_checkpoint(destination)  # weights_only=True
    assert checkpoint["epoch"] == 50 and checkpoint["step"] == 13500 and checkpoint["optimizer_q_phi"] is None
    assert checkpoint["authors_config"]["model"]["type"] == f"CNN_{kind}"
    assert set(checkpoint["q_f"]) == {"log_var", "u"} and torch.equal(checkpoint["q_f"]["u"], q_f["u"])
    similarity = similarity_from_checkpoint(checkpoint, str(destination))
    assert similarity.kind == kind and similarity.learnable
    fixed, warped = torch.rand(2, 1, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    ours = similarity(fixed, warped, torch.ones_like(fixed))
    theirs = reference_data_term(model, kind, authors_layout(fixed), authors_layout(warped))
    torch.testing.assert_close(ours, theirs.reshape(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_an_asymmetric_kernel_gives_the_authors_features(tmp_path, kind):
    """A first-layer kernel with one off-centre tap, in the authors' order, and an LCC window with one heavy corner:
    the imported metric's f(F) is the authors' f of their tensor, voxel by voxel, put back in our voxel order, and q_f's
    images follow the same map."""
    source, model, q_f = write_authors_checkpoint(tmp_path / f"checkpoint_{kind}.pt", kind)
    with torch.no_grad():
        model["enc.enc.0.main.weight"].zero_()
        model["enc.enc.0.main.weight"][:, 0, 0, 1, 2] = 1.0  # the tap at (-1, 0, +1) of the authors' axes
        if kind == "LCC":
            model["kernel.weight"].fill_(1.0)
            model["kernel.weight"][0, 0, 2, 0, 1] = 3.0
        q_f["u"].copy_(torch.rand(q_f["u"].shape, generator=torch.Generator().manual_seed(4)))
    write_authors_checkpoint(source, kind, model_state=model, q_f_state=q_f)
    checkpoint = load_checkpoint(import_authors_metric(source, tmp_path / "imported.pt"))
    similarity = similarity_from_checkpoint(checkpoint, "imported")
    fixed, warped = torch.rand(2, 1, 1, *SHAPE, generator=torch.Generator().manual_seed(2))

    def authors_features(x):
        for i in range(3):
            x = F.leaky_relu(F.conv3d(F.pad(x, [1] * 6, mode="replicate"), model[f"enc.enc.{i}.main.weight"],
                                      model[f"enc.enc.{i}.main.bias"]), 0.2)
        return F.conv1d(x.flatten(2), model["agg.weight"]).view(1, 1, *x.shape[2:])

    with torch.no_grad():
        ours = similarity.features(fixed)
        theirs = authors_features(authors_layout(fixed))
    torch.testing.assert_close(authors_layout(ours), theirs, rtol=1e-5, atol=1e-6)
    assert (ours - fixed).abs().max() > 0.1  # the kernel is far from the identity: orientation matters
    torch.testing.assert_close(authors_layout(checkpoint["q_f"]["u"]), q_f["u"])
    data = similarity(fixed, warped, torch.ones_like(fixed))
    torch.testing.assert_close(data, reference_data_term(model, kind, authors_layout(fixed),
                                                         authors_layout(warped)).reshape(1), rtol=1e-4, atol=1e-4)


def test_a_malicious_config_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"
    source, _, _ = write_authors_checkpoint(tmp_path / "evil.pt", "SSD", config=Marker(marker))
    destination = import_authors_metric(source, tmp_path / "imported.pt")
    assert not marker.exists()
    assert load_checkpoint(destination)["authors_config"] is None
    loaded = restricted_torch_load(source)
    assert repr(loaded["config"].state["_config"]) == "<inert posix.system>"
    assert loaded["config"].state["_config"].args == (f"touch {marker}",)


@pytest.mark.parametrize("where", ["model", "optimizer_q_phi", "top"])
def test_code_anywhere_in_the_file_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    model = authors_state("SSD")
    changes = {"model": {"model": {**model, "agg.weight": Marker(marker)}},
               "optimizer_q_phi": {"optimizer_q_phi": {"state": {0: Marker(marker)}}},
               "top": {"payload": Marker(marker)}}[where]
    source, _, _ = write_authors_checkpoint(tmp_path / "evil.pt", "SSD", **changes)
    destination = tmp_path / "imported.pt"
    if where == "model":
        with pytest.raises(CheckpointError, match=r"evil\.pt: refused: \['model.agg.weight'\] are not tensors"):
            import_authors_metric(source, destination)
        assert not destination.exists()
    else:
        import_authors_metric(source, destination)
        assert "payload" not in load_checkpoint(destination)
    assert not marker.exists()


def test_other_files_are_refused_with_clear_messages(tmp_path):
    vxm = tmp_path / "checkpoint_VXM.pt"
    torch.save({"config": {"inshape": (128, 128, 128)}, "model_state": {}}, vxm)
    with pytest.raises(CheckpointError, match=f"{vxm}: a VoxelMorph checkpoint"):
        import_authors_metric(vxm, tmp_path / "out.pt")
    other = tmp_path / "other.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}, "q_f": {}}, other)
    with pytest.raises(CheckpointError, match=f"{other}: unexpected key 'conv.weight'"):
        import_authors_metric(other, tmp_path / "out.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"cannot read {garbage}"):
        import_authors_metric(garbage, tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_VXM.pt", "garbage.pt", "other.pt"]
