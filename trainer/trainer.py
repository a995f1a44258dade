"""Learning theta (and q_f): per batch, q_v inference then one contrastive theta/q_f step; a checkpoint per epoch."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model.energy import ContrastiveLoss
from model.variational import QF, QV
from trainer.build import (batch_seed, build_dataset, build_energy, build_labels, build_loader, build_similarity,
                           to_device)
from trainer.checkpoint import is_pretrained_model, load_similarity, load_state, save_checkpoint
from trainer.monitor import TrainingMonitor
from trainer.q_v_inference import denormals_flushed, fit_q_v
from trainer.q_v_store import QVStore
from trainer.run_folder import get_logger
from utils.config import Config, ConfigError
from utils.distributed import Context, all_reduce_mean, barrier


class Trainer:
    """One training run in ``folder``; resumes from ``checkpoint`` (a dict from load_checkpoint) when given.

    Building it checks everything (config, data, checkpoint, saved q_v states) and writes nothing, so a run that
    cannot start leaves no folder behind; ``train`` writes. ``reset_q_v`` starts every pair's q_v afresh in the
    first epoch of a resumed run instead of from its saved state.
    """

    def __init__(self, config: Config, folder: Path, context: Context, checkpoint: dict | None = None,
                 reset_q_v: bool = False):
        config.require_training()
        self.config, self.folder, self.context = config, Path(folder), context
        device = context.device
        self.dataset = build_dataset(config, context)
        fixed_ids = {fixed for fixed, _ in self.dataset.pairs}
        if len(fixed_ids) != 1:
            raise ConfigError(f"{config.source}: data_loader.args.im_pairs: training learns q_f over one atlas, "
                              f"but the pairs list {len(fixed_ids)} fixed images")
        self.loader = build_loader(self.dataset, config, context, shuffle=True)
        torch.manual_seed(config.seed)  # the same config starts from the same Dirac initialisation
        self.similarity = build_similarity(config)
        self.energy = build_energy(config, self.similarity).to(device)
        q_f_args = config.q_f.args
        self.q_f = QF(config.data_loader.args.dims, q_f_args.sigma_init, q_f_args.u_init)
        self.contrastive = ContrastiveLoss(self.similarity, self.q_f).to(device)
        self.optimizer_theta = torch.optim.Adam(self.similarity.parameters(), lr=config.optimizer_q_phi.args.lr)
        self.optimizer_q_f = torch.optim.Adam(self.q_f.parameters(), lr=config.optimizer_q_f.args.lr)
        self.start_epoch, self.step = 1, 0
        if checkpoint is not None:
            self._resume(checkpoint)
        self.store = QVStore(self.folder / "q_v")
        self.fresh_q_v_epoch = self.start_epoch if reset_q_v else 1
        if self.start_epoch > self.fresh_q_v_epoch:
            self.store.check(self.dataset.pair_ids, self.start_epoch, self.energy.transformation.velocity_shape)
        self.step_module = (DistributedDataParallel(self.contrastive, device_ids=[device.index]
                                                    if device.type == "cuda" else None)
                            if context.distributed else self.contrastive)
        self.labels = build_labels(config)
        self.logger = self.writer = self.monitor = None  # made by train(): building writes nothing

    def _resume(self, checkpoint: dict) -> None:
        load_similarity(self.similarity, checkpoint, checkpoint["source"])
        if is_pretrained_model(checkpoint):  # a new run starts from its weights
            if getattr(checkpoint["q_f"].get("u"), "shape", None) == self.q_f.u.shape:  # q_f too, on the same grid
                load_state(self.q_f, checkpoint, "q_f")
            return
        load_state(self.q_f, checkpoint, "q_f")
        load_state(self.optimizer_theta, checkpoint, "optimizer_q_phi")
        load_state(self.optimizer_q_f, checkpoint, "optimizer_q_f")
        self.start_epoch, self.step = checkpoint["epoch"] + 1, checkpoint["step"]

    def _q_v_for(self, pair_ids: list[str], epoch: int) -> QV:
        """The batch's q_v: each pair's state saved in the previous epoch, or the initial q_v in the first epoch
        (of the run, or of a resumed run with --reset-q-v)."""
        args = self.config.data_loader.args
        shape = self.energy.transformation.velocity_shape
        initial = QV.initial(1, shape, args.sigma_v_init, args.u_v_init)
        fresh = epoch <= self.fresh_q_v_epoch
        states = [initial.state(0) if fresh else self.store.load(pid, epoch, shape) for pid in pair_ids]
        return QV.from_states(states, self.context.device)

    def train_batch(self, batch: dict, epoch: int, index: int) -> dict[str, float]:
        """q_v inference for the batch, save q_v, then one theta/q_f step; returns rank-averaged losses."""
        torch.manual_seed(batch_seed(self.config.seed, epoch, index, self.context.rank))
        fixed, moving = to_device(batch["fixed"], self.context.device), to_device(batch["moving"], self.context.device)
        q_v = self._q_v_for(batch["pair_id"], epoch)
        terms = fit_q_v(self.energy, q_v, fixed["im"], moving["im"], fixed["mask"],
                        self.config.trainer.no_iters_q_v, self.config.optimizer_q_v.args.lr,
                        progress=self.context.is_main)
        for i, pid in enumerate(batch["pair_id"]):
            self.store.save(pid, epoch, q_v.state(i))
        self.monitor.after_q_v(batch, q_v, self.energy, self.q_f, step=self.step + 1)
        warped = self.energy.sample_warped(q_v, moving["im"])
        self.optimizer_theta.zero_grad(set_to_none=True)
        self.optimizer_q_f.zero_grad(set_to_none=True)
        with denormals_flushed(self.context.device.type == "cpu"):
            loss_theta = self.step_module(fixed["im"], warped, fixed["mask"])
            loss_theta.backward()
        self.optimizer_theta.step()
        self.optimizer_q_f.step()
        logged = torch.stack([t.mean() for t in terms.values()] + [loss_theta.detach()])
        logged = all_reduce_mean(logged, self.context).tolist()
        return dict(zip([f"q_v/{k}" for k in terms] + ["theta/loss"], logged))

    def train(self) -> Path | None:
        """Run the remaining epochs; returns the path of the last checkpoint (None when nothing was left to do)."""
        self.logger = get_logger(self.folder, self.context, "train")
        self.writer = SummaryWriter(str(self.folder / "log")) if self.context.is_main else None
        self.monitor = TrainingMonitor(self.writer, self.config, self.context, self.labels)  # Dice, images, histograms
        if self.start_epoch > 1:
            self.logger.info("resuming after epoch %d (step %d)%s", self.start_epoch - 1, self.step,
                             ", q_v reset" if self.fresh_q_v_epoch > 1 else "")
        last = None
        for epoch in range(self.start_epoch, self.config.trainer.no_epochs + 1):
            self.loader.sampler.set_epoch(epoch)
            bar = tqdm(self.loader, desc=f"epoch {epoch}/{self.config.trainer.no_epochs}",
                       disable=not self.context.is_main)
            for index, batch in enumerate(bar):
                values = self.train_batch(batch, epoch, index)
                self.step += 1
                bar.set_postfix({"q_v loss": f"{values['q_v/loss']:.4g}", "theta loss": f"{values['theta/loss']:.4g}"})
                if self.writer is not None:
                    for key, value in values.items():
                        self.writer.add_scalar(key, value, self.step)
            self.monitor.end_epoch(epoch, self.step, self.similarity, self.q_f)
            last = self._end_epoch(epoch)
        if self.writer is not None:
            self.writer.close()
        return last

    def _end_epoch(self, epoch: int) -> Path:
        """Checkpoint on rank 0 (atomically), then drop the previous one; every rank waits for it."""
        path = self.folder / "checkpoints" / f"checkpoint_epoch{epoch}.pt"
        barrier(self.context)
        if self.context.is_main:
            save_checkpoint(path, epoch=epoch, step=self.step, similarity=self.similarity, q_f=self.q_f,
                            optimizer_theta=self.optimizer_theta, optimizer_q_f=self.optimizer_q_f,
                            config=self.config.to_dict())
            for old in path.parent.glob("checkpoint_epoch*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
            self.logger.info("epoch %d done, checkpoint %s", epoch, path)
        barrier(self.context)
        return path
