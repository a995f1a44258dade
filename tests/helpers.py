"""Small configs and data shared by the end-to-end tests."""
from __future__ import annotations

import json
from pathlib import Path

from data_loader.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
SYNTHBRAIN = REPO.parent / "shared" / "data" / "synthbrain"


def tiny_config(tmp_path: Path, size: int = 16, subjects: int = 3, **trainer) -> Path:
    """A copy of the demo training config on a tiny demo dataset in tmp_path; returns the config path."""
    data = tmp_path / "data"
    if not data.exists():
        make_demo_dataset(data, no_subjects=subjects, size=size, seed=1)
    config = json.loads((REPO / "configs" / "demo" / "train.json").read_text())
    args = config["data_loader"]["args"]
    args.update({"data_path": str(data), "dims": [size] * 3, "batch_size": 1})
    args.pop("demo")
    config["trainer"].update({"no_epochs": 2, "no_iters_q_v": 3, "save_dir": str(tmp_path / "saved"), **trainer})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path
