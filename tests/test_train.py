"""End-to-end training and registration on tiny demo data: learning, resuming, failing clearly."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from model.variational import QF, QV
from tests.demo_config import tiny_config, train_killed
from trainer.build import build_dataset, build_energy, build_similarity
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.q_v_inference import fit_q_v
from trainer import q_v_inference
from trainer.trainer import Trainer
from utils.config import ConfigError, load_config
from utils.distributed import setup
from utils.flow import warp
from utils.metrics import dice


def _weights(checkpoint_path):
    checkpoint = load_checkpoint(checkpoint_path)
    return {**checkpoint["model"], **{f"q_f.{k}": v for k, v in checkpoint["q_f"].items()}}


def test_training_writes_run_folder_and_changes_theta(tmp_path):
    config_path = tiny_config(tmp_path)
    checkpoint_path = train.main(["-c", str(config_path), "--device", "cpu"])
    folder = checkpoint_path.parent.parent
    assert checkpoint_path.name == "checkpoint_epoch2.pt"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["trainer"]["no_epochs"] == 2 and saved["data_loader"]["args"]["dims"] == [16, 16, 16]
    assert sorted(p.name for p in (folder / "q_v").iterdir()) == [
        f"sub-01_sub-0{k}.epoch{e}.pt" for k in (2, 3) for e in (1, 2)]
    assert list((folder / "log").iterdir()), "no TensorBoard events written"
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 4
    initial = build_similarity(load_config(config_path)).state_dict()
    moved = [k for k in initial if initial[k].shape == checkpoint["model"][k].shape
             and not torch.allclose(initial[k], checkpoint["model"][k], atol=1e-6)]
    assert moved, "theta did not change during training"


def test_freeze_theta_keeps_theta_and_q_f_and_runs_the_same_q_v_schedule(tmp_path, monkeypatch):
    """The control run of the CPU protocol: theta and q_f end exactly at their initialisation, the q_v iterations
    are those of a learning run, and the contrastive loss is still logged."""
    counts = []

    def counting(*args, **kwargs):
        counts.append(args[5])
        return fit_q_v(*args, **kwargs)

    monkeypatch.setattr(q_v_inference, "fit_q_v", counting)
    config_path = tiny_config(tmp_path, subjects=2, no_epochs=3, no_iters_q_v_warm=1, freeze_theta=True)
    checkpoint_path = train.main(["-c", str(config_path), "--device", "cpu"])
    assert counts == [3, 1, 1]
    checkpoint = load_checkpoint(checkpoint_path)
    torch.manual_seed(0)  # the config's seed: the trainer's Dirac initialisation
    initial = build_similarity(load_config(config_path)).state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0, msg=key)
    q_f_args = load_config(config_path).q_f.args
    for key, value in QF([16, 16, 16], q_f_args.sigma_init, q_f_args.u_init).state_dict().items():
        torch.testing.assert_close(checkpoint["q_f"][key], value, rtol=0, atol=0, msg=key)
    events = EventAccumulator(str(checkpoint_path.parent.parent / "log"))
    events.Reload()
    assert {"theta/loss", "epoch/dice"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("epoch/dice")) == 3


def test_resume_after_a_kill_mid_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Kill during epoch 2 after one pair's q_v was saved; resuming from epoch 1 must give the same result."""
    straight = train.main(["-c", str(tiny_config(tmp_path / "a")), "--device", "cpu"])

    checkpoint = train_killed(monkeypatch, Trainer, tiny_config(tmp_path / "b"), tmp_path / "b" / "saved", 2, 1)
    resumed = train.main(["-r", str(checkpoint), "--device", "cpu"])

    assert resumed.parent == checkpoint.parent
    expected, found = _weights(straight), _weights(resumed)
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)
    assert load_checkpoint(resumed)["step"] == load_checkpoint(straight)["step"]


def test_keep_checkpoints_keeps_those_epochs_and_survives_a_resume(tmp_path):
    """The budget sweep's checkpoints: the listed epochs stay in kept/, each the state of that epoch, while
    checkpoints/ holds only the last one; a resumed run keeps adding to kept/."""
    first = train.main(["-c", str(tiny_config(tmp_path, no_epochs=3, keep_checkpoints=[1, 3])), "--device", "cpu"])
    last = train.main(["-r", str(first), "--set", "trainer.no_epochs=4", "--set", "trainer.keep_checkpoints=[1,3,4]",
                       "--device", "cpu"])
    folder = last.parent.parent
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint_epoch4.pt"]
    kept = {p.name: load_checkpoint(p) for p in (folder / "kept").iterdir()}
    assert sorted(kept) == ["checkpoint_epoch1.pt", "checkpoint_epoch3.pt", "checkpoint_epoch4.pt"]
    assert [kept[f"checkpoint_epoch{e}.pt"]["step"] for e in (1, 3, 4)] == [2, 6, 8]  # two pairs, batch 1
    for key, value in load_checkpoint(last)["model"].items():
        torch.testing.assert_close(kept["checkpoint_epoch4.pt"]["model"][key], value, rtol=0, atol=0)
    assert not torch.equal(kept["checkpoint_epoch1.pt"]["model"]["features.convs.0.weight"],
                           kept["checkpoint_epoch3.pt"]["model"]["features.convs.0.weight"])


def test_resume_can_extend_a_finished_run(tmp_path):
    first = train.main(["-c", str(tiny_config(tmp_path, no_epochs=1)), "--device", "cpu"])
    extended = train.main(["-r", str(first), "--set", "trainer.no_epochs=2", "--device", "cpu"])
    assert extended.name == "checkpoint_epoch2.pt" and not first.exists()


@pytest.mark.parametrize("warm, expected", [(None, [3, 3, 3]), (1, [3, 1, 1])])
def test_warm_started_epochs_use_no_iters_q_v_warm(tmp_path, monkeypatch, warm, expected):
    """The first epoch runs no_iters_q_v; later epochs, whose q_v resumes from saved states, no_iters_q_v_warm."""
    counts = []

    def counting(*args, **kwargs):
        counts.append(args[5])
        return fit_q_v(*args, **kwargs)

    monkeypatch.setattr(q_v_inference, "fit_q_v", counting)
    config = tiny_config(tmp_path, subjects=2, no_epochs=3, **({} if warm is None else {"no_iters_q_v_warm": warm}))
    train.main(["-c", str(config), "--device", "cpu"])
    assert counts == expected


def test_q_v_loss_falls_and_dice_rises_on_a_known_deformation(tmp_path):
    """Baseline SSD registration of the demo atlas to itself moved by a known translation of (2, -1.5, 1) voxels."""
    config = load_config(tiny_config(tmp_path, size=24, subjects=2),
                         ["model.args.learnable=false", "optimizer_q_v.args.lr=0.1"], mode="test")
    torch.manual_seed(0)
    fixed = build_dataset(config, setup("cpu"))[0]["fixed"]
    shift = torch.tensor([2.0, -1.5, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24)
    moving_im = warp(fixed["im"][None], shift)
    moving_seg = warp(fixed["seg"][None], shift, mode="nearest")
    energy = build_energy(config, build_similarity(config))
    q_v = QV.initial(1, energy.transformation.velocity_shape, 0.5, 0.1)
    args = (energy, q_v, fixed["im"][None], moving_im, fixed["mask"][None])
    first = fit_q_v(*args, no_iters=1, lr=0.1)["data_term"].item()
    last = fit_q_v(*args, no_iters=100, lr=0.1)["data_term"].item()
    assert last < 0.5 * first
    with torch.no_grad():
        displacement = energy.displacement(q_v.mu)
    labels = [10, 11, 12, 16, 17, 49, 50, 51, 53]
    before = dice(fixed["seg"][0], moving_seg[0, 0], labels)
    after = dice(fixed["seg"][0], warp(moving_seg, displacement, mode="nearest")[0, 0], labels)
    assert after.mean() > before.mean() + 0.15
    centre = displacement[0, :, 8:16, 8:16, 8:16].mean(dim=(1, 2, 3))
    torch.testing.assert_close(centre, torch.tensor([-2.0, 1.5, -1.0]), atol=0.5, rtol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["trainer"].update(no_epoch=3), "trainer.no_epoch: unknown key"),
    (lambda c: c["trainer"].pop("no_iters_q_v"), "trainer.no_iters_q_v: missing key"),
    (lambda c: c["data_loader"]["args"].update(batch_size="4"), "data_loader.args.batch_size: expected int"),
    (lambda c: c.pop("q_f"), "q_f: missing key"),
])
def test_bad_config_fails_before_anything_is_written(tmp_path, edit, message):
    config_path = tiny_config(tmp_path)
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as error:
        train.main(["-c", str(config_path), "--device", "cpu"])
    assert str(config_path) in str(error.value)
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").rglob("*.pt"))


def test_resuming_from_a_voxelmorph_checkpoint_is_refused(tmp_path):
    path = tmp_path / "vxm.pt"
    torch.save({"config": {"inshape": (16, 16, 16)}, "model_state": {"flow.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="VoxelMorph"):
        train.main(["-r", str(path), "--device", "cpu"])


def test_command_line_reports_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "train.py", "-c", str(tmp_path / "missing.json")],
                            capture_output=True, text=True, cwd=train.__file__.rsplit("/", 1)[0])
    assert result.returncode != 0
    assert "error: config file" in result.stderr and "Traceback" not in result.stderr
