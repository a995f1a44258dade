"""VoxelMorph trained with a similarity metric as its loss, on tiny demo data: run folder, exact resume, the learnt
metric as a frozen data term, registration with test.py, and the clear failures of mismatched files."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import tarfile

import pytest
import torch

import test as test_entry
import train
from model.similarity import SimilarityMetric
from model.voxelmorph import VxmDense
from model.variational import QF
from tests.demo_config import tiny_config, tiny_vxm_config, train_killed, trained_with_alignment_ranking
from trainer import outputs
from trainer.checkpoint import (VXM_CHECKPOINT_KIND, CheckpointError, load_checkpoint, load_training_checkpoint,
                                load_voxelmorph, save_checkpoint)
from trainer.vxm_trainer import VxmTrainer
from utils.config import ConfigError, load_config

SIZE = 16


def _trained(path):
    checkpoint = load_training_checkpoint(path)
    return {**checkpoint["model_state"], **{f"adam.{k}": v for k, v in
                                           checkpoint["optimizer"]["state"].items() if isinstance(v, torch.Tensor)}}


def _metric_checkpoint(tmp_path, kind: str = "SSD"):
    """A learnt-metric checkpoint as train.py writes it, with theta moved off its Dirac initialisation."""
    config_path = tiny_config(tmp_path / "metric", size=SIZE)
    config = json.loads(config_path.read_text())
    config["model"]["type"], config["data_loss"]["type"] = f"CNN_{kind}", kind
    torch.manual_seed(0)
    similarity = SimilarityMetric(kind, learnable=True)
    with torch.no_grad():
        for parameter in similarity.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    q_f = QF((SIZE,) * 3)
    path = tmp_path / f"metric_{kind}.pt"
    save_checkpoint(path, epoch=1, step=1, similarity=similarity, q_f=q_f,
                    optimizer_theta=torch.optim.Adam(similarity.parameters()),
                    optimizer_q_f=torch.optim.Adam(q_f.parameters()), config=config)
    return path, similarity.state_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny VoxelMorph training run (2 epochs of 2 pairs); returns (config path, last checkpoint)."""
    root = tmp_path_factory.mktemp("vxm")
    config_path = tiny_vxm_config(root, size=SIZE)
    return config_path, train.main(["-c", str(config_path), "--device", "cpu"])


def test_training_writes_a_voxelmorph_run_folder_and_changes_the_network(trained):
    config_path, last = trained
    folder = last.parent.parent
    assert last.name == "checkpoint_epoch2.pt" and [p.name for p in last.parent.iterdir()] == [last.name]
    assert json.loads((folder / "config.json").read_text())["model"]["type"] == "VxmDense"
    assert list((folder / "log").iterdir()) and (folder / "train.log").is_file()
    assert not (folder / "q_v").exists()
    checkpoint = load_training_checkpoint(last)
    assert checkpoint["kind"] == VXM_CHECKPOINT_KIND and checkpoint["epoch"] == 2 and checkpoint["step"] == 4
    assert checkpoint["voxelmorph"]["inshape"] == [SIZE] * 3
    torch.manual_seed(load_config(config_path).seed)
    initial = VxmDense((SIZE,) * 3, int_steps=12, int_downsize=2).state_dict()
    assert not torch.equal(initial["flow.weight"], checkpoint["model_state"]["flow.weight"])
    model, ours = load_voxelmorph(last)
    assert ours is not None and model.inshape == (SIZE,) * 3


def test_resume_after_a_kill_mid_epoch_equals_an_uninterrupted_run(trained, tmp_path, monkeypatch):
    _, straight = trained
    checkpoint = train_killed(monkeypatch, VxmTrainer, tiny_vxm_config(tmp_path, size=SIZE), tmp_path / "saved", 2, 1)
    resumed = train.main(["-r", str(checkpoint), "--device", "cpu"])
    assert resumed.parent == checkpoint.parent
    expected, found = _trained(straight), _trained(resumed)
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_learnt_metric_is_the_frozen_data_term(tmp_path):
    metric, theta = _metric_checkpoint(tmp_path)
    config_path = tiny_vxm_config(tmp_path, size=SIZE, no_epochs=1)
    config = json.loads(config_path.read_text())
    config["data_loss"]["args"]["checkpoint"] = str(metric)
    config_path.write_text(json.dumps(config))
    from trainer.run_folder import create_run_folder
    from utils.distributed import setup
    context = setup("cpu")
    parsed = load_config(config_path)
    trainer = VxmTrainer(parsed, create_run_folder(parsed.trainer.save_dir, parsed.name, "train", context), context)
    assert trainer.loss.similarity.learnable
    assert not any(p.requires_grad for p in trainer.loss.similarity.parameters())
    trainer.train()
    for key, value in trainer.loss.similarity.state_dict().items():
        assert torch.equal(value, theta[key]), f"theta.{key} changed while training VoxelMorph"


def test_a_learnt_metric_of_the_other_type_is_refused(tmp_path):
    metric, _ = _metric_checkpoint(tmp_path, "LCC")
    config_path = tiny_vxm_config(tmp_path, size=SIZE, no_epochs=1)
    with pytest.raises(ConfigError, match=r"data_loss\.type: SSD, but the metric in .*metric_LCC\.pt is a learnt LCC"):
        train.main(["-c", str(config_path), "--device", "cpu", "--set", f"data_loss.args.checkpoint={metric}"])


def _test_run(config_path, checkpoint) -> tuple:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        folder = test_entry.main(["-c", str(config_path), "-r", str(checkpoint), "--device", "cpu"])
    with open(folder / "metrics.csv", newline="") as handle:
        return folder, list(csv.DictReader(handle)), stdout.getvalue()


def test_test_py_registers_with_our_voxelmorph_checkpoint(trained, tmp_path):
    _, last = trained
    config_path = tiny_vxm_config(tmp_path, size=SIZE, name="test_vxm.json")
    folder, rows, printed = _test_run(config_path, last)
    assert {r["sample"] for r in rows} == {"identity", "mean"}
    assert {r["pair_id"] for r in rows} == {"sub-01_sub-02", "sub-01_sub-03"}
    assert "s per pair" in printed and "time per pair (VoxelMorph" in printed
    pair = folder / outputs.PAIRS_FOLDER / "sub-01_sub-02"
    for name in (outputs.WARPED_IM, outputs.WARPED_SEG, outputs.DISPLACEMENT, outputs.DET_JACOBIAN, outputs.PANEL):
        assert (pair / name).is_file(), name
    assert not (pair / outputs.DISPLACEMENT_STD).exists() and not (pair / outputs.SAMPLES_FOLDER).exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["no_samples"] == 0 and summary["uncertainty"]["per_pair"] == {}
    assert summary["mean_dice_after"] is not None


def _authors_files(tmp_path, model: VxmDense) -> tuple:
    """``model`` saved as the authors saved theirs: {'config', 'model_state'} in a .pt, and that .pt in a .tar.gz."""
    config = {"flow_log_sigma_bias": -5, "use_probs": False, "bidir": False, "int_downsize": model.int_downsize,
              "int_steps": model.int_steps, "unet_feat_mult": 1, "nb_unet_levels": None,
              "nb_unet_features": [tuple(f) for f in model.nb_unet_features], "inshape": model.inshape}
    pt = tmp_path / "checkpoint_VXM_SSD_demo.pt"
    torch.save({"config": config, "model_state": model.state_dict()}, pt)
    tarball = tmp_path / "VXM_SSD_demo.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(pt, arcname=pt.name)
    return pt, tarball


def test_test_py_registers_with_the_authors_files_as_with_ours(trained, tmp_path):
    _, last = trained
    model, _ = load_voxelmorph(last)
    pt, tarball = _authors_files(tmp_path, model)
    config_path = tiny_vxm_config(tmp_path, size=SIZE, name="test_vxm.json", save_outputs=False, save_figures=False)
    _, ours, _ = _test_run(config_path, last)
    for checkpoint in (pt, tarball):
        _, rows, _ = _test_run(config_path, checkpoint)
        assert [r["dice"] for r in rows] == [r["dice"] for r in ours], checkpoint.name


def test_a_network_for_other_dims_fails_clearly_before_anything_is_written(trained, tmp_path):
    _, last = trained
    config_path = tiny_vxm_config(tmp_path, size=SIZE, name="test_vxm.json")
    with pytest.raises(CheckpointError, match=r"takes inputs of shape \[16, 16, 16\].*dims \[32, 32, 32\]") as error:
        test_entry.main(["-c", str(config_path), "-r", str(last), "--device", "cpu",
                         "--set", "data_loader.args.dims=[32, 32, 32]"])
    assert str(last) in str(error.value)
    assert not (tmp_path / "saved").exists()


def test_kind_mismatches_name_the_file(trained, tmp_path):
    vxm_config, vxm_checkpoint = trained
    metric, _ = _metric_checkpoint(tmp_path)
    q_v_test = tiny_config(tmp_path / "q_v", size=SIZE)
    vxm_test = tiny_vxm_config(tmp_path, size=SIZE, name="test_vxm.json")
    cases = [
        (test_entry.main, ["-c", str(q_v_test), "-r", str(vxm_checkpoint)], vxm_checkpoint, "VoxelMorph checkpoint"),
        (test_entry.main, ["-c", str(vxm_test), "-r", str(metric)], metric, "learnt similarity-metric checkpoint"),
        (train.main, ["-c", str(vxm_config), "-r", str(metric)], metric, "holds a learnt metric"),
        (train.main, ["-c", str(q_v_test), "-r", str(vxm_checkpoint)], vxm_checkpoint, "holds a VoxelMorph network"),
    ]
    for main, argv, path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            main([*argv, "--device", "cpu"])
        assert str(path) in str(error.value)
    with pytest.raises(CheckpointError, match="give the network to test with -r"):
        test_entry.main(["-c", str(vxm_test), "--device", "cpu"])


def test_the_authors_network_cannot_be_resumed(trained, tmp_path):
    model, _ = load_voxelmorph(trained[1])
    pt, _ = _authors_files(tmp_path, model)
    with pytest.raises(CheckpointError, match="no training state to resume") as error:
        train.main(["-r", str(pt), "--device", "cpu"])
    assert str(pt) in str(error.value)


def test_a_metric_learnt_with_the_alignment_ranking_loss_is_the_frozen_data_term(tmp_path):
    """A checkpoint of the issue-20 objective holds a metric like any other: VoxelMorph's data_loss.args.checkpoint
    loads it, with its weights, frozen."""
    metric = trained_with_alignment_ranking(tmp_path / "metric", size=SIZE)
    checkpoint = load_checkpoint(metric)
    assert checkpoint["config"]["theta_loss"]["type"] == "alignment_ranking"
    config_path = tiny_vxm_config(tmp_path, size=SIZE, no_epochs=1)
    from trainer.run_folder import create_run_folder
    from utils.distributed import setup
    context = setup("cpu")
    parsed = load_config(config_path, [f"data_loss.args.checkpoint={metric}"])
    trainer = VxmTrainer(parsed, create_run_folder(parsed.trainer.save_dir, parsed.name, "train", context), context)
    assert trainer.loss.similarity.learnable
    assert not any(p.requires_grad for p in trainer.loss.similarity.parameters())
    for key, value in trainer.loss.similarity.state_dict().items():
        assert torch.equal(value, checkpoint["model"][key]), key
