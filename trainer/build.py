"""Objects of a run built from a validated config."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from data_loader.dataset import DEFAULT_LABELS, PairDataset, load_labels
from data_loader.demo import ensure_demo_dataset
from model.alignment import AlignmentRankingLoss, perturbed_warps
from model.energy import ContrastiveLoss, Energy
from model.similarity import SimilarityMetric
from model.transformation import SVF, SVFFD
from model.variational import QF, QV
from utils.config import ConfigError, QVTestConfig, QVTrainConfig, RunConfig
from utils.distributed import Context, barrier
from utils.sobolev import sobolev_kernel


def build_dataset(config: RunConfig, context: Context) -> PairDataset:
    """The pair dataset; rank 0 makes the embedded demo data first when the config file asks for it (a config read
    from a checkpoint never makes any: it would decide where data is written)."""
    args = config.data_loader.args
    if args.demo is not None and config.from_checkpoint and not args.data_path.is_dir():
        raise ConfigError(f"{config.source}: data_loader.args.data_path: folder {args.data_path} does not exist, "
                          f"and a checkpoint's config does not make demo data; make it with python -m "
                          f"data_loader.demo {args.data_path}, or resume with the config file (-c)")
    if args.demo is not None and not config.from_checkpoint:
        if context.is_main:
            ensure_demo_dataset(args.data_path, no_subjects=args.demo.no_subjects, size=args.demo.size,
                                seed=args.demo.seed)
        barrier(context)
    return PairDataset(args.data_path, args.im_pairs, args.dims, args.im_filename, args.mask_filename,
                       args.seg_filename)


def build_labels(config: RunConfig) -> dict[str, int]:
    """Evaluation structures (name -> label id): the config's labels file, else the 15 structures of METHOD.md."""
    labels = config.data_loader.args.labels
    return load_labels(labels) if labels else dict(DEFAULT_LABELS)


def build_loader(dataset: PairDataset, config: RunConfig, context: Context, shuffle: bool) -> DataLoader:
    """Batches of pairs, sharded across ranks (a one-rank sampler in a single process, for the same order)."""
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle,
                                 seed=config.seed)
    args = config.data_loader.args
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.no_workers,
                      pin_memory=context.device.type == "cuda", persistent_workers=args.no_workers > 0)


def build_similarity(config: QVTestConfig, learnable: bool | None = None) -> SimilarityMetric:
    """g_theta: SSD or LCC, baseline or Dirac-initialised learnable (``learnable`` None: as the config says)."""
    args = config.model.args
    learnable = args.learnable if learnable is None else learnable
    return SimilarityMetric(config.data_loss.type, learnable, args.s, args.no_features,
                            args.activation.args.get("negative_slope", 0.2), config.trainer.channels_last,
                            args.lcc_form)


def build_transformation(config: QVTestConfig) -> SVF:
    """SVF or SVFFD on the config's grid."""
    dims, args = config.data_loader.args.dims, config.transformation_module.args
    if config.transformation_module.type == "SVFFD_3D":
        return SVFFD(dims, args.cps, args.no_steps)
    return SVF(dims, args.no_steps)


def build_energy(config: QVTestConfig, similarity: SimilarityMetric) -> Energy:
    """The q_v objective with the config's regulariser weight, Sobolev kernel and uniform noise."""
    sobolev = config.Sobolev_grad
    kernel = sobolev_kernel(sobolev.s, sobolev.lambda_) if sobolev.enabled else None
    noise = config.trainer.uniform_noise
    return Energy(build_transformation(config), similarity, config.reg_loss.args.w_reg, kernel,
                  noise.magnitude if noise.enabled else 0.0)


def build_theta_loss(config: QVTrainConfig, similarity: SimilarityMetric, q_f: QF, energy: Energy
                     ) -> tuple[nn.Module, Callable[[QV, torch.Tensor], torch.Tensor]]:
    """The theta step's loss module (``theta_loss.type``) and what it is given: the warps of M that one sample of q_v
    makes, ``sample_warped(q_v, moving)``."""
    theta_loss = config.theta_loss
    if theta_loss.type == "contrastive":
        return ContrastiveLoss(similarity, q_f), energy.sample_warped
    args = theta_loss.alignment_ranking
    return (AlignmentRankingLoss(similarity, args.temperature),
            partial(perturbed_warps, energy, no_perturbations=args.no_perturbations, spacing=args.spacing,
                    magnitude=args.magnitude))


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed for one batch of one rank: a resumed run draws the same random numbers as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 10_007 + batch * 101 + rank) % (2 ** 63)


def to_device(subject: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of one side of a batch on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in subject.items()}
