"""A learnt metric loads from its checkpoint alone (no config) and works as the loss of a plain registration loop."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

from model.similarity import SimilarityMetric
import test as test_entry
import train as train_entry
from data_loader.demo import make_demo_dataset
from model.variational import QF
from trainer.checkpoint import CheckpointError, load_checkpoint, pretrained_checkpoint, save_checkpoint
from trainer.pretrained import load_metric, pack
from utils.pretrained import load_manifest
from utils.flow import warp
from utils.io import atomic_torch_save

from demo_config import demo_config_dict, tiny_config

SHAPE = (16, 16, 16)


def save_metric(path, similarity: SimilarityMetric):
    q_f = {"log_var": torch.zeros(1, 1, *SHAPE), "u": torch.zeros(1, 1, *SHAPE)}
    atomic_torch_save(pretrained_checkpoint(similarity, q_f, epoch=3, step=6), path)
    return path


def perturbed(similarity: SimilarityMetric, seed: int = 0) -> SimilarityMetric:
    """Weights away from the Dirac initialisation, so that a wrongly rebuilt metric shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in similarity.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return similarity


def shifted_pair(shift) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random texture and the same texture moved by ``shift`` voxels (moving(x + shift) = fixed(x))."""
    noise = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    fixed = F.avg_pool3d(F.pad(noise, [1] * 6, mode="replicate"), 3, stride=1)
    return fixed, warp(fixed, -torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE))


@pytest.mark.parametrize("kind, s, no_features, slope", [("SSD", 1, (2, 4), 0.1), ("LCC", 2, (4, 8, 8), 0.2)])
def test_the_checkpoint_alone_rebuilds_the_metric(tmp_path, kind, s, no_features, slope):
    similarity = perturbed(SimilarityMetric(kind, True, s=s, no_features=no_features, negative_slope=slope))
    loss = load_metric(save_metric(tmp_path / "metric.pt", similarity))
    assert loss.similarity.config() == similarity.config()
    assert not any(p.requires_grad for p in loss.parameters()) and not loss.training
    fixed, warped = torch.rand(2, 2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 1, *SHAPE) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(loss(fixed, warped, mask), similarity(fixed, warped, mask).mean())
        torch.testing.assert_close(loss(fixed, warped), similarity(fixed, warped, torch.ones_like(fixed)).mean())


@pytest.mark.parametrize("kind", ["SSD", "LCC"])
def test_a_plain_registration_loop_with_the_learnt_metric_as_its_loss(tmp_path, kind):
    """The loop of README's "Pretrained models" section: optimise a displacement against the loaded metric."""
    path = save_metric(tmp_path / "metric.pt", SimilarityMetric(kind, True))
    fixed, moving = shifted_pair((1.0, -0.7, 0.0))

    loss_fn = load_metric(path)
    displacement = torch.zeros(1, 3, *fixed.shape[2:], requires_grad=True)  # voxel units
    optimizer = torch.optim.Adam([displacement], lr=0.05)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        smoothness = sum((displacement.diff(dim=d) ** 2).sum() for d in (2, 3, 4))
        loss = loss_fn(fixed, warp(moving, displacement)) + 0.1 * smoothness
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.1 * abs(losses[0])
    # inside, the displacement heads for the shift (+1 along axis 0, -0.7 along axis 1, 0 along axis 2)
    mean = displacement.detach()[0, :, 4:12, 4:12, 4:12].mean((1, 2, 3))
    assert mean[0] > 0.05 and mean[1] < -0.02 and abs(mean[2]) < 0.5 * mean[0]


def test_files_that_are_not_metric_checkpoints_fail_clearly(tmp_path):
    vxm = tmp_path / "checkpoint_VXM.pt"
    torch.save({"config": {"inshape": (128, 128, 128)}, "model_state": {}}, vxm)
    with pytest.raises(CheckpointError, match=f"{vxm}: this is a VoxelMorph checkpoint"):
        load_metric(vxm)
    tarball = tmp_path / "VXM_SSD_learnt.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(vxm, arcname=vxm.name)
    with pytest.raises(CheckpointError, match=f"{tarball}: it is a tarball: give pretrained:NAME"):
        load_metric(tarball)
    old = tmp_path / "old.pt"
    checkpoint = pretrained_checkpoint(SimilarityMetric("SSD", True), {}, epoch=1, step=1)
    del checkpoint["similarity_config"]
    torch.save(checkpoint, old)
    with pytest.raises(CheckpointError, match=f"{old}: the checkpoint does not describe its metric"):
        load_metric(old)


def test_pack_keeps_the_metric_and_drops_the_optimizers(tmp_path):
    similarity, q_f = perturbed(SimilarityMetric("LCC", True)), QF(SHAPE)
    run = tmp_path / "checkpoint_epoch3.pt"
    save_checkpoint(run, epoch=3, step=6, similarity=similarity, q_f=q_f,
                    optimizer_theta=torch.optim.Adam(similarity.parameters()),
                    optimizer_q_f=torch.optim.Adam(q_f.parameters()), config={"name": "demo_LCC"})
    packed = load_checkpoint(pack(run, tmp_path / "demo_LCC.pt"))
    assert packed["optimizer_q_phi"] is None and packed["optimizer_q_f"] is None and packed["config"] is None
    assert packed["run_config"] == {"name": "demo_LCC"} and packed["epoch"] == 3
    fixed, warped = torch.rand(2, 1, 1, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(load_metric(tmp_path / "demo_LCC.pt")(fixed, warped),
                                   similarity(fixed, warped, torch.ones_like(fixed)).mean())


@pytest.mark.parametrize("name, kind", [("demo_SSD", "SSD"), ("demo_LCC", "LCC")])
def test_the_shipped_demo_metrics_load_offline(name, kind):
    entry = load_manifest()[name]
    assert entry.url == f"{name}.pt" and entry.size < 1_000_000 and entry.checksum.startswith("sha256:")
    loss = load_metric(f"pretrained:{name}")
    assert loss.similarity.kind == kind and loss.similarity.learnable
    image = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(loss(image, image.flip(2)))


def test_test_py_registers_with_a_pretrained_models_own_metric(tmp_path, capsys):
    """``test.py -c <an SSD config> -r pretrained:demo_LCC`` registers with the learnt LCC of the checkpoint."""
    data = make_demo_dataset(tmp_path / "data", no_subjects=2, size=16)
    config = demo_config_dict(data, tmp_path / "saved", no_iters_q_v=2, no_samples_test=2, save_outputs=False,
                              save_figures=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    folder = test_entry.main(["-c", str(tmp_path / "config.json"), "-r", "pretrained:demo_LCC", "--device", "cpu"])
    assert json.loads((folder / "summary.json").read_text())["no_pairs"] == 1
    assert "registering with the metric of pretrained:demo_LCC: {'kind': 'LCC', 'learnable': True" in \
        capsys.readouterr().err


def test_train_py_starts_a_new_run_from_a_pretrained_model(tmp_path):
    config = tiny_config(tmp_path, no_epochs=1)
    first = train_entry.main(["-c", str(config), "--device", "cpu"])
    packed = pack(first, tmp_path / "pretrained" / "metric.pt")
    with pytest.raises(CheckpointError, match=r"metric\.pt is a pretrained model, not a run to resume: give a config"):
        train_entry.main(["-r", str(packed), "--device", "cpu"])
    # theta and q_f all but frozen (lr 1e-12): the new run ends where the pretrained weights are, not where the
    # Dirac initialisation is (the first run's epoch moved theta by ~1e-4)
    frozen = ["--set", "optimizer_q_phi.args.lr=1e-12", "--set", "optimizer_q_f.args.lr=1e-12"]
    last = train_entry.main(["-c", str(config), "-r", str(packed), "--device", "cpu", *frozen])
    assert last.parent.parent != first.parent.parent and not (tmp_path / "pretrained" / "q_v").exists()
    started, ended = load_checkpoint(packed), load_checkpoint(last)
    for key in ("model", "q_f"):
        for name, value in started[key].items():
            torch.testing.assert_close(ended[key][name], value, rtol=0, atol=1e-8)
