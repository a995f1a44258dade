"""trainer.checkpoint: weights-only round trip, clear errors for anything that is not a fitting checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.similarity import SimilarityMetric
from model.variational import QF
from trainer.checkpoint import (CHECKPOINT_KIND, FORMAT_VERSION, CheckpointError, load_checkpoint, load_similarity,
                                save_checkpoint)
from utils.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "train.json"
SHAPE = (6, 7, 8)


def trained_objects(kind="SSD", no_features=(4, 8, 8), seed=0):
    """A metric, q_f and their optimizers after one step, so that every state is non-trivial."""
    torch.manual_seed(seed)
    similarity, q_f = SimilarityMetric(kind, learnable=True, no_features=no_features), QF(SHAPE)
    optimizer_theta = torch.optim.Adam(similarity.parameters(), lr=1e-3)
    optimizer_q_f = torch.optim.Adam(q_f.parameters(), lr=1e-3)
    fixed, warped = torch.rand(2, 1, 1, *SHAPE)
    fixed_1, _ = q_f(fixed)
    mask = torch.ones_like(fixed)
    (similarity(fixed, warped, mask) - similarity(fixed_1, warped, mask)).sum().backward()
    optimizer_theta.step()
    optimizer_q_f.step()
    return similarity, q_f, optimizer_theta, optimizer_q_f


def save(path, kind="SSD", no_features=(4, 8, 8), seed=0):
    similarity, q_f, optimizer_theta, optimizer_q_f = trained_objects(kind, no_features, seed)
    save_checkpoint(path, epoch=3, step=12, similarity=similarity, q_f=q_f, optimizer_theta=optimizer_theta,
                    optimizer_q_f=optimizer_q_f, config=load_config(DEMO_CONFIG).to_dict())
    return similarity, q_f, optimizer_theta, optimizer_q_f


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_round_trip(tmp_path, kind):
    path = tmp_path / "run" / "checkpoint.pth"
    similarity, q_f, optimizer_theta, optimizer_q_f = save(path, kind)
    # the file is readable with weights_only=True: no pickled objects in it
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == CHECKPOINT_KIND and raw["format_version"] == FORMAT_VERSION
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 3 and checkpoint["step"] == 12
    assert checkpoint["config"] == load_config(DEMO_CONFIG).to_dict()

    torch.manual_seed(99)  # a fresh, different initialisation
    fresh = SimilarityMetric(kind, learnable=True)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), similarity.state_dict().values()))
    load_similarity(fresh, checkpoint, str(path))
    for key, value in similarity.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if kind == "LCC":  # the learnt window is saved and loaded with theta, and it has moved off the box of ones
        assert "window" in raw["model"] and not torch.equal(raw["model"]["window"], torch.ones(1, 1, 3, 3, 3))
        assert torch.equal(fresh.window, similarity.window)
    fresh_q_f = QF(SHAPE)
    fresh_q_f.load_state_dict(checkpoint["q_f"])
    assert torch.equal(fresh_q_f.u, q_f.u) and torch.equal(fresh_q_f.log_var, q_f.log_var)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1.0)
    fresh_optimizer.load_state_dict(checkpoint["optimizer_q_phi"])
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3
    state = fresh_optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], optimizer_theta.state_dict()["state"][0]["exp_avg"])
    torch.optim.Adam(fresh_q_f.parameters()).load_state_dict(checkpoint["optimizer_q_f"])
    assert not list(path.parent.glob(".tmp-*"))  # the atomic write left nothing behind


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pth")


def test_corrupt_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save(path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="cannot read") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


class Payload:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, expected", [
    ([1, 2, 3], "list"),
    (torch.zeros(3), "Tensor"),
    ({"kind": "something-else", "model": {}}, "something-else"),
    ({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, "state_dict"),
    ({"config": None, "model_state": {"w": torch.zeros(2)}}, "model_state"),  # a config that is not a dict
    ({0: torch.zeros(2), "epoch": 1}, "epoch"),  # keys of mixed types
])
def test_not_a_learnsim_checkpoint(tmp_path, content, expected):
    path = tmp_path / "checkpoint.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert expected in str(error.value) and str(path) in str(error.value)


def test_voxelmorph_checkpoint_is_named(tmp_path):
    path = tmp_path / "vxm.pth"
    torch.save({"config": {"inshape": (8, 8, 8), "int_steps": 12, "bidir": False},
                "model_state": {"flow.weight": torch.zeros(3, 16, 3, 3, 3), "flow.bias": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="VoxelMorph"):
        load_checkpoint(path)


def test_other_format_version(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind, learnable", [("LCC", True), ("SSD", False)])
def test_load_similarity_rejects_another_metric(tmp_path, kind, learnable):
    path = tmp_path / "checkpoint.pth"
    save(path, "SSD")
    target = SimilarityMetric(kind, learnable=learnable)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=str(path.name)) as error:
        load_similarity(target, load_checkpoint(path), str(path))
    assert f"'type': '{kind}', 'learnable': {learnable}" in str(error.value)  # says what was asked for
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # left untouched


@pytest.mark.parametrize("saved, configured", [((2, 4, 4), (4, 8, 8)), ((4, 8, 8), (4, 8)), ((4, 8), (4, 8, 8))])
def test_load_similarity_rejects_other_shapes(tmp_path, saved, configured):
    path = tmp_path / "checkpoint.pth"
    save(path, "SSD", no_features=saved)
    target = SimilarityMetric("SSD", learnable=True, no_features=configured)
    with pytest.raises(CheckpointError, match="no_features") as error:
        load_similarity(target, load_checkpoint(path), str(path))
    assert str(path) in str(error.value)


def test_lcc_checkpoint_of_the_other_form_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save(path, "LCC")
    textbook = SimilarityMetric("LCC", learnable=True, lcc_form="textbook")
    with pytest.raises(CheckpointError, match="textbook"):
        load_similarity(textbook, load_checkpoint(path), str(path))
