"""Helpers of the output tests: tiny configs derived from configs/demo/test.json, and a one-thread CPU."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from utils.config import Config, parse_config

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


def demo_config(data_path: Path, save_dir: Path, **kwargs) -> Config:
    return parse_config(demo_config_dict(data_path, save_dir, **kwargs), ROOT, "demo test config")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
