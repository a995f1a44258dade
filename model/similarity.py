"""Similarity metrics g_theta(F, M o phi): SSD or LCC on images, or on features of a Dirac-initialised CNN."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from utils.similarity import LCC_FORMS, lcc_data_term, lcc_map, lcc_map_textbook, ssd_data_term, ssd_map

DIRAC_NOISE = 1e-7  # scale of the off-centre weights, biases and aggregation noise at initialisation


class FeatureExtractor(nn.Module):
    """f: 3D convs (kernel 3, replicate padding, LeakyReLU) then a 1x1 aggregation over channels without bias.

    Initialised to the Dirac delta so that f(x) ~= x for x >= 0: the learnt metric starts as its baseline.
    ``channels_last`` runs the convolutions on channels-last (NDHWC) tensors, faster with oneDNN on CPU
    (benchmarks/README.md); it changes nothing but the float32 round-off.
    """

    def __init__(self, no_features: Sequence[int] = (4, 8, 8), negative_slope: float = 0.2,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        channels = [1, *no_features]
        self.convs = nn.ModuleList(nn.Conv3d(c_in, c_out, 3, padding=1, padding_mode="replicate")
                                   for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.activation = nn.LeakyReLU(negative_slope)
        self.aggregation = nn.Conv1d(channels[-1], 1, kernel_size=1, bias=False)
        self.init_dirac()

    @torch.no_grad()
    def init_dirac(self) -> None:
        """Near-zero weights but a positive centre tap, L1-normalised over output channels; aggregation ~1."""
        for conv in self.convs:
            conv.weight.normal_(0.0, DIRAC_NOISE)
            centre = torch.rand(conv.out_channels, conv.in_channels, dtype=conv.weight.dtype)
            conv.weight[:, :, 1, 1, 1] = centre / centre.sum(0, keepdim=True)
            conv.bias.normal_(0.0, DIRAC_NOISE)
        self.aggregation.weight.fill_(1.0).add_(torch.randn_like(self.aggregation.weight) * DIRAC_NOISE)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 1, D, H, W)."""
        memory_format = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        # theta frozen (the q_v iterations): only the image gradient is needed, and it is cheaper as a
        # forward convolution with the flipped kernel than through convolution_backward
        frozen = torch.is_grad_enabled() and not any(p.requires_grad for p in self.parameters())
        x = image
        for conv in self.convs:
            padding = [p for p in conv.padding for _ in range(2)]  # the same on both sides of each axis
            x = F.pad(x, padding, mode=conv.padding_mode).contiguous(memory_format=memory_format)
            x = _FrozenConv3d.apply(x, conv.weight, conv.bias, memory_format) if frozen else F.conv3d(
                x, conv.weight, conv.bias)
            x = self.activation(x)
        # the 1x1 aggregation (a Conv1d without bias) as a matrix product over channels: the same sums
        weight = self.aggregation.weight.squeeze(-1)  # (1, C)
        if self.channels_last:
            return torch.matmul(x.permute(0, 2, 3, 4, 1), weight.t()).permute(0, 4, 1, 2, 3)
        return torch.matmul(weight, x.flatten(2)).view_as(image)


class _FrozenConv3d(torch.autograd.Function):
    """conv3d(x, weight, bias) without padding, differentiable in x only (weight and bias are constants).

    The input gradient, a full correlation of the output gradient with the flipped and transposed kernel, is
    computed as a forward convolution, which oneDNN does faster on CPU than convolution_backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                memory_format: torch.memory_format) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.memory_format = memory_format
        return F.conv3d(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        padding = [k - 1 for k in weight.shape[2:]]
        grad_input = F.conv3d(grad_output.contiguous(memory_format=ctx.memory_format),
                              weight.flip(2, 3, 4).transpose(0, 1), padding=padding)
        return grad_input, None, None, None


class SimilarityMetric(nn.Module):
    """Data term of SSD (0.5 sum z) or LCC (-sum z) inside the fixed mask, on f(images).

    With ``learnable=False`` f is the identity (the baseline metric) and the module has no parameters; LCC then
    sums over a fixed box of ones. The learnt LCC also learns its (2s+1)^3 window ``window`` (ones at the start),
    as the reference trains every parameter of the model with theta. ``lcc_form``: ``reference`` (the default,
    METHOD.md) or ``textbook`` (window-centred), see utils.similarity.
    """

    def __init__(self, kind: str, learnable: bool, s: int = 1, no_features: Sequence[int] = (4, 8, 8),
                 negative_slope: float = 0.2, channels_last: bool = False, lcc_form: str = "reference"):
        super().__init__()
        if kind not in ("SSD", "LCC"):
            raise ValueError(f"unknown similarity metric {kind!r}: expected 'SSD' or 'LCC'")
        if lcc_form not in LCC_FORMS:
            raise ValueError(f"unknown LCC form {lcc_form!r}: expected one of {LCC_FORMS}")
        self.kind, self.s, self.lcc_form = kind, s, lcc_form
        self.features = (FeatureExtractor(no_features, negative_slope, channels_last) if learnable
                         else nn.Identity())
        self.no_features, self.negative_slope, self.channels_last = list(no_features), negative_slope, channels_last
        size = 2 * s + 1
        self.window = (nn.Parameter(torch.ones(1, 1, size, size, size)) if learnable and kind == "LCC" else None)

    @property
    def learnable(self) -> bool:
        return isinstance(self.features, FeatureExtractor)

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable: ``SimilarityMetric(**metric.config())`` rebuilds it."""
        return {"kind": self.kind, "learnable": self.learnable, "s": self.s, "no_features": self.no_features,
                "negative_slope": self.negative_slope, "channels_last": self.channels_last, "lcc_form": self.lcc_form}

    def z_map(self, fixed_features: torch.Tensor, warped_features: torch.Tensor) -> torch.Tensor:
        """Voxelwise similarity map z (B, 1, D, H, W) of two feature images."""
        if self.kind == "SSD":
            return ssd_map(fixed_features, warped_features)
        lcc = lcc_map if self.lcc_form == "reference" else lcc_map_textbook
        return lcc(fixed_features, warped_features, self.s, self.window)

    def data_term_from_features(self, fixed_features: torch.Tensor, warped_features: torch.Tensor,
                                mask: torch.Tensor) -> torch.Tensor:
        """Data term per pair (B,), given f(F) and f(M o phi)."""
        z = self.z_map(fixed_features, warped_features)
        return ssd_data_term(z, mask) if self.kind == "SSD" else lcc_data_term(z, mask)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Data term per pair (B,) of images (B, 1, D, H, W) inside the fixed mask."""
        return self.data_term_from_features(self.features(fixed), self.features(warped), mask)


class SimilarityLoss(nn.Module):
    """A similarity metric as a loss for any registration loop: ``loss(fixed, warped, mask=None)``.

    Returns the data term (SSD: 0.5 sum z, LCC: -sum z, summed over the voxels of the mask, default all),
    averaged over the batch; images (B, 1, D, H, W). theta is frozen; gradients flow to ``warped``.
    """

    def __init__(self, similarity: SimilarityMetric):
        super().__init__()
        self.similarity = similarity.requires_grad_(False)
        self.eval()

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(fixed)
        return self.similarity(fixed, warped, mask).mean()
