"""trainer.run_folder: run status, the resume layout, and the cleanup of what killed runs leave behind."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

import test as test_entry
import train as train_entry
from data_loader.demo import ensure_demo_dataset
from tests.demo_config import tiny_config, train_killed
from trainer.checkpoint import CheckpointError
from trainer.run_folder import get_logger, read_status, resumed_run_folder
from trainer.trainer import Trainer
from utils.distributed import setup


def test_status_of_finished_train_and_test_runs(tmp_path):
    config = tiny_config(tmp_path, no_epochs=1)
    checkpoint = train_entry.main(["-c", str(config), "--device", "cpu"])
    run = checkpoint.parent.parent
    assert read_status(run)["status"] == "finished" and read_status(run)["message"] is None
    result = test_entry.main(["-c", str(config), "-r", str(checkpoint), "--device", "cpu",
                              "--set", "trainer.save_outputs=false", "--set", "trainer.save_figures=false"])
    assert read_status(result)["status"] == "finished" and (result / "summary.json").is_file()


def test_a_killed_run_is_marked_failed_and_resume_cleans_up_and_can_reset_q_v(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, no_epochs=2)
    checkpoint = train_killed(monkeypatch, Trainer, config, tmp_path / "saved", 2)
    run = checkpoint.parent.parent
    assert read_status(run)["status"] == "failed" and read_status(run)["message"] == "interrupted"

    stale = [run / "checkpoints" / ".tmp-0123-checkpoint_epoch2.pt", run / "q_v" / ".tmp-4567-sub-01_sub-02.epoch2.pt"]
    for path in stale:
        path.write_bytes(b"half written")
    for path in (run / "q_v").glob("*.epoch1.pt"):
        path.unlink()  # q_v state lost: only a deliberate reset may go on
    # -c with the run's own config is allowed: it agrees with the checkpoint on every key
    resumed = train_entry.main(["-c", str(run / "config.json"), "-r", str(checkpoint), "--device", "cpu",
                                "--reset-q-v"])
    assert resumed == run / "checkpoints" / "checkpoint_epoch2.pt"
    assert read_status(run)["status"] == "finished"
    assert not any(path.exists() for path in stale)
    assert "q_v reset" in (run / "train.log").read_text()


def test_resumed_run_folder_is_the_checkpoint_s_run(tmp_path):
    run = tmp_path / "saved" / "x" / "train-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({}))
    assert resumed_run_folder(run / "checkpoints" / "checkpoint_epoch3.pt") == run
    for wrong in (run / "checkpoint_epoch3.pt", run / "checkpoints" / "model.pt"):
        with pytest.raises(CheckpointError, match="layout"):
            resumed_run_folder(wrong)


def test_stale_demo_builds_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "demo"
    target.mkdir()  # the dataset exists: only the cleanup runs
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-{'0' * 32}-demo"
    live = tmp_path / f".tmp-{os.getpid()}-{'1' * 32}-demo"
    for folder in (stale, live):
        (folder / "sub-01").mkdir(parents=True)
    ensure_demo_dataset(target)
    assert not stale.exists() and live.exists()


def test_a_full_disk_under_the_log_file_stops_the_run_with_the_file_named(tmp_path, monkeypatch):
    logger = get_logger(tmp_path, setup("cpu"), "train")
    (handler,) = [h for h in logger.handlers if hasattr(h, "baseFilename")]

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(handler.stream, "write", full)
    with pytest.raises(OSError) as error:
        logger.info("a line")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "train.log")
