"""trainer.q_v_store: epoch e starts from the state of epoch e - 1 and nothing else; missing or bad states fail."""
from __future__ import annotations

import pytest
import torch

from trainer.q_v_store import QVStateError, QVStore

SHAPE = (4, 4, 4)


def state(value: float, shape=SHAPE) -> dict[str, torch.Tensor]:
    return {key: torch.full((3, *shape), value) for key in ("mu", "log_var", "u")}


def test_epoch_one_starts_fresh(tmp_path):
    assert QVStore(tmp_path / "q_v").load("a_b", 1, SHAPE) is None
    assert not (tmp_path / "q_v").exists(), "building or reading the store writes nothing"


def test_epoch_e_loads_the_state_of_epoch_e_minus_1_only(tmp_path):
    store = QVStore(tmp_path)
    for epoch in (1, 2, 3):
        store.save("a_b", epoch, state(float(epoch)))
    # a resumed run at epoch 3 (checkpoint of epoch 2): the epoch-3 file of the killed run is not used
    assert store.load("a_b", 3, SHAPE)["mu"].unique().tolist() == [2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_b.epoch2.pt", "a_b.epoch3.pt"]


def test_an_older_generation_does_not_stand_in_for_a_missing_one(tmp_path):
    store = QVStore(tmp_path)
    store.save("a_b", 1, state(1.0))
    with pytest.raises(QVStateError, match=r"a_b\.epoch2\.pt.*missing.*--reset-q-v"):
        store.load("a_b", 3, SHAPE)
    with pytest.raises(QVStateError, match=r"a_b\.epoch2\.pt"):
        store.check(["a_b"], 3, SHAPE)


@pytest.mark.parametrize("content, message", [(b"garbage", "corrupt"), (None, "shape"), ({"mu": 1}, "tensor")])
def test_bad_states_name_the_file(tmp_path, content, message):
    path = tmp_path / "a_b.epoch1.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(state(0.0, (4, 4, 2)) if content is None else content, path)
    with pytest.raises(QVStateError, match=message) as error:
        QVStore(tmp_path).check(["a_b"], 2, SHAPE)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("pair_id", ["../a_b", "a/b", ".tmp-a_b", ""])
def test_pair_ids_cannot_leave_the_folder(tmp_path, pair_id):
    with pytest.raises(QVStateError, match="pair ID"):
        QVStore(tmp_path / "q_v").save(pair_id, 1, state(0.0))
    assert not any(tmp_path.rglob("*.pt"))
