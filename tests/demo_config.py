"""Tiny configs for the end-to-end tests, derived from configs/demo/{train,test}.json."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from data_loader.demo import make_demo_dataset
from utils.config import QVTestConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST_CONFIG = json.loads((ROOT / "configs" / "demo" / "test.json").read_text())


def demo_config_dict(data_path: Path, save_dir: Path, dims=(16, 16, 16), labels: str | None = "labels.json",
                     batch_size: int = 2, **trainer) -> dict:
    """configs/demo/test.json on existing data at ``data_path``, tiny: few q_v iterations and samples."""
    data = copy.deepcopy(DEMO_TEST_CONFIG)
    args = data["data_loader"]["args"]
    args.pop("demo")
    args.update(data_path=str(data_path), dims=list(dims), batch_size=batch_size)
    if labels is None:
        args.pop("labels")
    else:
        args["labels"] = labels
    data["trainer"].update({"save_dir": str(save_dir), "no_iters_q_v": 4, "no_samples_test": 3, **trainer})
    return data


def demo_config(data_path: Path, save_dir: Path, **kwargs) -> QVTestConfig:
    return parse_config(demo_config_dict(data_path, save_dir, **kwargs), ROOT, "demo test config")


def tiny_config(tmp_path: Path, size: int = 16, subjects: int = 3, **trainer) -> Path:
    """configs/demo/train.json on a tiny demo dataset in tmp_path, written to tmp_path/config.json."""
    data = tmp_path / "data"
    if not data.exists():
        make_demo_dataset(data, no_subjects=subjects, size=size, seed=1)
    config = json.loads((ROOT / "configs" / "demo" / "train.json").read_text())
    args = config["data_loader"]["args"]
    args.update({"data_path": str(data), "dims": [size] * 3, "batch_size": 1})
    args.pop("demo")
    config["trainer"].update({"no_epochs": 2, "no_iters_q_v": 3, "save_dir": str(tmp_path / "saved"), **trainer})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def tiny_vxm_config(tmp_path: Path, size: int = 16, subjects: int = 3, name: str = "train_vxm.json",
                    **trainer) -> Path:
    """configs/demo/``name`` (a VoxelMorph config) on a tiny demo dataset in tmp_path, written to tmp_path/name."""
    data = tmp_path / "data"
    if not data.exists():
        make_demo_dataset(data, no_subjects=subjects, size=size, seed=1)
    config = json.loads((ROOT / "configs" / "demo" / name).read_text())
    args = config["data_loader"]["args"]
    args.update({"data_path": str(data), "dims": [size] * 3, "batch_size": 1})
    args.pop("demo")
    epochs = {"no_epochs": 2} if config["data_loader"]["args"]["test"] is False else {}
    config["trainer"].update({**epochs, "save_dir": str(tmp_path / "saved"), **trainer})
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def train_killed(monkeypatch, trainer_class: type, config_path: Path, saved: Path, epoch: int,
                 index: int | None = None) -> Path:
    """Run train.py on ``config_path`` and kill it (KeyboardInterrupt) at batch ``index`` of ``epoch`` (its first
    batch when None); returns the checkpoint of epoch - 1 that the killed run left under ``saved``."""
    import train

    original = trainer_class.train_batch

    def killed(self, batch, current_epoch, current_index):
        if current_epoch == epoch and (index is None or current_index == index):
            raise KeyboardInterrupt("killed")
        return original(self, batch, current_epoch, current_index)

    monkeypatch.setattr(trainer_class, "train_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["-c", str(config_path), "--device", "cpu"])
    monkeypatch.setattr(trainer_class, "train_batch", original)
    (checkpoint,) = saved.rglob(f"checkpoint_epoch{epoch - 1}.pt")
    return checkpoint


def trained_with_alignment_ranking(tmp_path: Path, size: int = 16) -> Path:
    """The last checkpoint of a tiny training run (2 epochs, 2 q_v iterations) whose theta step is the
    alignment-ranking loss; its run folder is checkpoint.parent.parent."""
    import train

    config_path = tiny_config(tmp_path, size=size, no_iters_q_v=2)
    return train.main(["-c", str(config_path), "--device", "cpu", "--set",
                       'theta_loss={"type": "alignment_ranking", "args": {"no_perturbations": 1}}'])
