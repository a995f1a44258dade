"""Two gloo processes on one CPU: pairs are sharded, gradients are averaged, theta and q_f stay identical."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.demo_config import ROOT as REPO, tiny_config, tiny_vxm_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world_size`` on this machine, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _train_rank(rank: int, world_size: int, port: int, config_path: str, out: str) -> None:
    _as_rank(rank, world_size, port)
    from tests.test_energy import recorded_step
    from trainer.run_folder import create_run_folder
    from trainer.trainer import Trainer
    from utils.config import load_config
    from utils.distributed import setup, teardown

    context = setup("cpu")
    config = load_config(config_path)
    folder = create_run_folder(config.trainer.save_dir, config.name, "train", context)
    trainer = Trainer(config, folder, context)
    pairs_seen, steps = [], []
    original = trainer.train_batch

    def recording(batch, epoch, index):
        pairs_seen.extend(batch["pair_id"])
        return original(batch, epoch, index)

    trainer.train_batch = recording
    recorded_step(trainer, steps)
    gradients, theta_step = [], trainer.optimizer_theta.step

    def stepping(*args, **kwargs):  # the gradients that theta and q_f step with, after DDP's all-reduce
        gradients.append({name: p.grad.clone() for name, p in trainer.theta_loss.named_parameters()})
        return theta_step(*args, **kwargs)

    trainer.optimizer_theta.step = stepping
    trainer.train()
    torch.save({"model": trainer.similarity.state_dict(), "q_f": trainer.q_f.state_dict(), "pairs": pairs_seen,
                "steps": steps, "gradients": gradients, "folder": str(folder)}, f"{out}/rank{rank}.pt")
    teardown()


def test_two_gloo_ranks_step_with_the_mean_gradient_of_their_pairs(tmp_path):
    """Each rank takes one batch of its own pairs; both step with the mean of the two ranks' contrastive gradients
    (replayed in this process from each rank's recorded inputs and random state) and end where one process
    stepping with that mean gradient ends."""
    from tests.test_energy import adam_step, replayed_gradients
    from utils.config import load_config

    config_path = tiny_config(tmp_path, subjects=5, no_epochs=1, no_iters_q_v=2)
    config = load_config(config_path)
    config.data_loader.args.batch_size = 2
    config_path.write_text(json.dumps(config.to_dict()))
    mp.spawn(_train_rank, args=(2, _free_port(), str(config_path), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["folder"] == rank1["folder"], "ranks wrote to different run folders"
    assert set(rank0["pairs"]).isdisjoint(rank1["pairs"]), "pairs were not sharded"
    assert len(rank0["pairs"]) == len(rank1["pairs"]) == 2
    assert len(rank0["steps"]) == len(rank1["steps"]) == 1
    for part in ("model", "q_f"):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{part}.{key} differs between ranks"
            assert torch.equal(rank0["steps"][0][part][key], rank1["steps"][0][part][key]), "ranks started apart"

    contrastive, gradients_0 = replayed_gradients(config, rank0["steps"][0])
    _, gradients_1 = replayed_gradients(config, rank1["steps"][0])
    mean = [(g0 + g1) / 2 for g0, g1 in zip(gradients_0, gradients_1)]
    names = [name for name, _ in contrastive.named_parameters()]
    for rank in (rank0, rank1):
        assert list(rank["gradients"][0]) == names
        for name, gradient in zip(names, mean):
            torch.testing.assert_close(rank["gradients"][0][name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    for name, g0, g1 in zip(names, gradients_0, gradients_1):  # so the mean is neither rank's own gradient
        if name in ("similarity.features.aggregation.weight", "q_f.u"):
            assert not torch.allclose(g0, g1, rtol=1e-2), f"the ranks' gradients of {name} coincide"
    expected = adam_step(contrastive, mean, config)
    final = {**{f"similarity.{k}": v for k, v in rank0["model"].items()},
             **{f"q_f.{k}": v for k, v in rank0["q_f"].items()}}
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-9, msg=name)
    initial = torch.load(next(tmp_path.rglob("checkpoint_epoch1.pt")), weights_only=True)["model"]
    assert all(torch.equal(initial[k], rank0["model"][k]) for k in initial)


def test_two_gloo_ranks_step_with_the_mean_alignment_ranking_gradient(tmp_path):
    """The issue-20 theta loss under DistributedDataParallel: each rank's theta gradient, after the all-reduce, is
    the mean of the two ranks' ranking-loss gradients on their own pairs (replayed here from the recorded warps),
    both ranks end with the same theta, and q_f, which the loss does not use, does not move."""
    from model.alignment import AlignmentRankingLoss
    from trainer.build import build_similarity
    from utils.config import load_config

    config_path = tiny_config(tmp_path, subjects=5, no_epochs=1, no_iters_q_v=2)
    config = load_config(config_path, ['theta_loss={"type": "alignment_ranking", "args": {"no_perturbations": 2}}'])
    config.data_loader.args.batch_size = 2
    config_path.write_text(json.dumps(config.to_dict()))
    mp.spawn(_train_rank, args=(2, _free_port(), str(config_path), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0["pairs"]).isdisjoint(rank1["pairs"]) and len(rank0["steps"]) == len(rank1["steps"]) == 1
    replayed = []
    for rank in (rank0, rank1):
        record = rank["steps"][0]
        assert record["warped"].shape[0] == 5 * record["fixed"].shape[0]
        similarity = build_similarity(config)
        similarity.load_state_dict(record["model"])
        loss = AlignmentRankingLoss(similarity)
        replayed.append(dict(zip([name for name, _ in loss.named_parameters()], torch.autograd.grad(
            loss(record["fixed"], record["warped"], record["mask"]), list(loss.parameters())))))
    for name in replayed[0]:
        mean = (replayed[0][name] + replayed[1][name]) / 2
        for rank in (rank0, rank1):
            torch.testing.assert_close(rank["gradients"][0][name], mean, rtol=1e-4, atol=1e-7, msg=name)
    assert not torch.allclose(replayed[0]["similarity.features.aggregation.weight"],
                              replayed[1]["similarity.features.aggregation.weight"], rtol=1e-2)
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), f"model.{key} differs between ranks"
    for key, value in rank0["q_f"].items():
        assert torch.equal(value, rank0["steps"][0]["q_f"][key]) and torch.equal(value, rank1["q_f"][key])


def _train_vxm_rank(rank: int, world_size: int, port: int, config_path: str, out: str) -> None:
    _as_rank(rank, world_size, port)
    from trainer.run_folder import create_run_folder
    from trainer.vxm_trainer import VxmTrainer
    from utils.config import load_config
    from utils.distributed import setup, teardown

    context = setup("cpu")
    config = load_config(config_path)
    trainer = VxmTrainer(config, create_run_folder(config.trainer.save_dir, config.name, "train", context), context)
    trainer.train()
    torch.save(trainer.model.state_dict(), f"{out}/vxm_rank{rank}.pt")
    teardown()


def test_two_gloo_ranks_train_one_voxelmorph_network(tmp_path):
    config_path = tiny_vxm_config(tmp_path, subjects=5, no_epochs=1)
    mp.spawn(_train_vxm_rank, args=(2, _free_port(), str(config_path), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"vxm_rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"{key} differs between ranks"
    (checkpoint,) = tmp_path.rglob("checkpoint_epoch1.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 2  # 4 pairs, batch 1, two ranks: two steps each
    assert all(torch.equal(saved["model_state"][k], rank0[k]) for k in rank0)


@pytest.mark.parametrize("launcher", [
    ["-m", "torch.distributed.run", "--nproc_per_node=2"],
    ["-m", "torch.distributed.launch", "--nproc_per_node=2"],
], ids=["torchrun", "legacy-launch"])
def test_train_py_runs_under_the_launchers(tmp_path, launcher):
    config_path = tiny_config(tmp_path, no_epochs=1, no_iters_q_v=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, *launcher, f"--master_port={_free_port()}", "train.py",
                             "-c", str(config_path), "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("checkpoint_epoch1.pt"))) == 1


def test_one_process_started_by_a_launcher_joins_the_process_group(monkeypatch):
    import torch.distributed as dist

    from utils.distributed import setup, teardown

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    context = setup("cpu")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert not context.distributed
    finally:
        teardown()
    assert not dist.is_initialized()
