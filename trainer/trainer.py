"""Learning theta (and q_f): per batch, q_v inference then one theta/q_f step (the paper's contrastive loss, or the
``theta_loss`` the config names); a checkpoint per epoch."""
from __future__ import annotations

from pathlib import Path

import torch

from model.variational import QF
from trainer.base import BaseTrainer, distributed
from trainer.build import build_energy, build_similarity, build_theta_loss, to_device
from trainer.checkpoint import CHECKPOINT_KIND, is_pretrained_model, load_similarity, load_state, metric_state
from trainer.q_v_inference import denormals_flushed, infer_q_v
from trainer.q_v_store import QVStore
from utils.config import ConfigError, QVTrainConfig
from utils.distributed import Context, all_reduce_mean


class Trainer(BaseTrainer):
    """One run learning a metric in ``folder``; resumes from ``checkpoint`` (a dict from load_checkpoint) when given.

    ``reset_q_v`` starts every pair's q_v afresh in the first epoch of a resumed run instead of from its saved
    state.
    """

    checkpoint_kind = CHECKPOINT_KIND
    progress_keys = ("q_v/loss", "theta/loss")

    def __init__(self, config: QVTrainConfig, folder: Path, context: Context, checkpoint: dict | None = None,
                 reset_q_v: bool = False):
        if not isinstance(config, QVTrainConfig):
            raise ConfigError(f"{config.source}: not a q_v training config ({type(config).__name__})")
        super().__init__(config, folder, context)
        device = context.device
        fixed_ids = {fixed for fixed, _ in self.dataset.pairs}
        if len(fixed_ids) != 1:
            raise ConfigError(f"{config.source}: data_loader.args.im_pairs: training learns q_f over one atlas, "
                              f"but the pairs list {len(fixed_ids)} fixed images")
        torch.manual_seed(config.seed)  # the same config starts from the same Dirac initialisation
        self.similarity = build_similarity(config)
        self.energy = build_energy(config, self.similarity).to(device)
        q_f_args = config.q_f.args
        self.q_f = QF(config.data_loader.args.dims, q_f_args.sigma_init, q_f_args.u_init)
        theta_loss, self.sample_warped = build_theta_loss(config, self.similarity, self.q_f, self.energy)
        self.theta_loss = theta_loss.to(device)
        self.optimizer_theta = torch.optim.Adam(self.similarity.parameters(), lr=config.optimizer_q_phi.args.lr)
        self.optimizer_q_f = torch.optim.Adam(self.q_f.parameters(), lr=config.optimizer_q_f.args.lr)
        if checkpoint is not None:
            self.resume(checkpoint)
        self.store = QVStore(self.folder / "q_v")
        self.fresh_q_v_epoch = self.start_epoch if reset_q_v else 1
        if self.start_epoch > self.fresh_q_v_epoch:
            self.store.check(self.dataset.pair_ids, self.start_epoch, self.energy.transformation.velocity_shape)
        elif self.start_epoch > 1:
            self.notes.append("q_v reset")
        self.step_module = distributed(self.theta_loss, context)

    def checked_modules(self) -> dict[str, torch.nn.Module]:
        return {"theta": self.similarity, "q_f": self.q_f}

    def state(self) -> dict:
        return metric_state(self.similarity, self.q_f, self.optimizer_theta, self.optimizer_q_f)

    def load_state(self, checkpoint: dict) -> None:
        load_similarity(self.similarity, checkpoint, checkpoint["source"])
        if is_pretrained_model(checkpoint):  # a new run starts from its weights
            same_grid = getattr(checkpoint["q_f"].get("u"), "shape", None) == self.q_f.u.shape
            if same_grid:
                load_state(self.q_f, checkpoint, "q_f")
            self.notes.append(f"starting from pretrained theta{' and q_f' if same_grid else ' (q_f: other grid)'}")
            return
        load_state(self.q_f, checkpoint, "q_f")
        load_state(self.optimizer_theta, checkpoint, "optimizer_q_phi")
        load_state(self.optimizer_q_f, checkpoint, "optimizer_q_f")

    def _no_iters_q_v(self, epoch: int) -> int:
        """q_v iterations of an epoch: ``no_iters_q_v_warm`` once q_v resumes from saved states, when set."""
        warm = self.config.trainer.no_iters_q_v_warm
        return warm if warm is not None and epoch > self.fresh_q_v_epoch else self.config.trainer.no_iters_q_v

    def train_batch(self, batch: dict, epoch: int, index: int) -> dict[str, float]:
        """q_v inference for the batch, save q_v, then one theta/q_f step; returns rank-averaged losses."""
        fixed, moving = to_device(batch["fixed"], self.context.device), to_device(batch["moving"], self.context.device)
        shape = self.energy.transformation.velocity_shape
        # each pair's state saved in the previous epoch, or the initial q_v in the first epoch (of the run, or of a
        # resumed run with --reset-q-v)
        fresh = epoch <= self.fresh_q_v_epoch
        states = [None if fresh else self.store.load(pid, epoch, shape) for pid in batch["pair_id"]]
        q_v, terms = infer_q_v(self.energy, fixed["im"], moving["im"], fixed["mask"], self.config, states,
                               progress=self.context.is_main, no_iters=self._no_iters_q_v(epoch),
                               pair_ids=batch["pair_id"])
        for i, pid in enumerate(batch["pair_id"]):
            self.store.save(pid, epoch, q_v.state(i))
        self.monitor.after_q_v(batch, q_v, self.energy, self.q_f, step=self.step + 1)
        warped = self.sample_warped(q_v, moving["im"])
        if self.config.trainer.freeze_theta:  # the control run: the theta loss is logged, nothing steps
            with torch.no_grad(), denormals_flushed(self.context.device.type == "cpu"):
                loss_theta = self.theta_loss(fixed["im"], warped, fixed["mask"])
        else:
            loss_theta = self.theta_step(fixed["im"], warped, fixed["mask"])
        logged = torch.stack([t.mean() for t in terms.values()] + [loss_theta.detach()])
        logged = all_reduce_mean(logged, self.context).tolist()
        return dict(zip([f"q_v/{k}" for k in terms] + ["theta/loss"], logged))

    def theta_step(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One step of theta and q_f (both optimizers on the same loss; q_f gets no gradient from a loss without it,
        and Adam leaves it as it is); returns the loss, detached."""
        self.optimizer_theta.zero_grad(set_to_none=True)
        self.optimizer_q_f.zero_grad(set_to_none=True)
        with denormals_flushed(self.context.device.type == "cpu"):
            loss_theta = self.step_module(fixed, warped, mask)
            loss_theta.backward()
        self.optimizer_theta.step()
        self.optimizer_q_f.step()
        return loss_theta.detach()

    def end_epoch(self, epoch: int) -> None:
        self.monitor.end_epoch(epoch, self.step, self.similarity, self.q_f)
