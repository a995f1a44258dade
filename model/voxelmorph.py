"""VoxelMorph's VxmDense, in the layout of the PyTorch ``voxelmorph`` 0.1 package, so the authors' checkpoints load.

Same state-dict keys (``unet_model.downarm.*``, ``unet_model.uparm.*``, ``unet_model.extras.*``, ``flow.*``) and
the same computation: a U-Net on cat([moving, fixed]) predicts a velocity, which is resized by 1 / int_downsize,
integrated by scaling and squaring at that size, resized back and used to warp the moving image. Warping and
integration are the project's (utils.flow), with VoxelMorph's conventions where they differ from ours:

- zero padding outside the image, in the integration and in the final warp (ours: border padding);
- the resize of the velocity (trilinear, align_corners=True) and of the displacement, both scaled by the factor.

The channel order agrees: VoxelMorph's flow channel k is along array axis k, in voxels, and its spatial
transformer reverses the channels for ``grid_sample``, as utils.grid.to_grid_order does.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.archive import read_member
from utils.flow import integrate_velocity, warp
from utils.io import torch_load_problem
from utils.state_dict import state_dict_mismatch

DEFAULT_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))  # encoder, decoder: VoxelMorph's default
PADDING_MODE = "zeros"  # VoxelMorph samples outside the image as 0 (the project's q_v warps pad with the border)
IGNORED_CONFIG_KEYS = ("flow_log_sigma_bias",)  # in the authors' configs, from a fork; unused by VxmDense
FLOW_INIT_STD = 1e-5  # VoxelMorph's initial flow-layer weights ~ N(0, 1e-5), bias 0: the network starts near id


class VoxelMorphError(ValueError):
    """A VoxelMorph config or checkpoint that cannot be used; the message names the file or key."""


class VxmOutput(NamedTuple):
    """What VxmDense computes for a pair."""

    warped: torch.Tensor  # moving image warped by phi = id + displacement, (B, C, *inshape)
    displacement: torch.Tensor  # (B, 3, *inshape), voxel units
    velocity: torch.Tensor  # before integration, (B, 3, *inshape // int_downsize), voxel units of that grid


class ConvBlock(nn.Module):
    """Conv3d (kernel 3, zero padding 1) then LeakyReLU(0.2); key ``main`` as in VoxelMorph."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.main = nn.Conv3d(in_channels, out_channels, 3, stride, 1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.main(x))


class Unet(nn.Module):
    """Encoder of stride-2 convs; decoder of conv, nearest x2 upsampling and skip concatenation; extra convs."""

    def __init__(self, encoder: Sequence[int], decoder: Sequence[int], in_channels: int = 2):
        super().__init__()
        self.downarm = nn.ModuleList()
        channels = in_channels
        for features in encoder:
            self.downarm.append(ConvBlock(channels, features, stride=2))
            channels = features
        skips = [*reversed(encoder[:-1]), in_channels]  # what is concatenated after each decoder conv
        self.uparm = nn.ModuleList()
        for i, features in enumerate(decoder[:len(encoder)]):
            self.uparm.append(ConvBlock(channels, features))
            channels = features + skips[i]
        self.extras = nn.ModuleList()
        for features in decoder[len(encoder):]:
            self.extras.append(ConvBlock(channels, features))
            channels = features
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for layer in self.downarm:
            skips.append(layer(skips[-1]))
        x = skips.pop()
        for layer in self.uparm:
            x = F.interpolate(layer(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        for layer in self.extras:
            x = layer(x)
        return x


def resize_flow(flow: torch.Tensor, shape: Sequence[int], factor: float) -> torch.Tensor:
    """Resize a vector field (B, 3, ...) to ``shape`` (trilinear, align_corners=True) and scale it by ``factor``.

    VoxelMorph's ResizeTransform, which asks for a scale factor; with align_corners=True the sampling depends
    only on the input and output sizes, so asking for the size is the same.
    """
    return F.interpolate(flow, size=tuple(shape), mode="trilinear", align_corners=True) * factor


class VxmDense(nn.Module):
    """VoxelMorph (Balakrishnan et al. 2019, diffeomorphic variant of Dalca et al. 2019) for 3D pairs.

    ``inshape``: the spatial shape (D, H, W) of the inputs, divisible by 2^len(encoder) and by int_downsize.
    ``int_steps`` scaling-and-squaring steps (0: the flow is the displacement), at 1 / ``int_downsize`` size.
    """

    def __init__(self, inshape: Sequence[int], nb_unet_features: Sequence[Sequence[int]] = DEFAULT_FEATURES,
                 int_steps: int = 7, int_downsize: int = 2):
        super().__init__()
        encoder, decoder = (tuple(int(n) for n in f) for f in nb_unet_features)
        self.inshape = tuple(int(n) for n in inshape)
        self.nb_unet_features = (encoder, decoder)
        self.int_steps, self.int_downsize = int(int_steps), int(int_downsize)
        if len(self.inshape) != 3:
            raise VoxelMorphError(f"inshape must have 3 sizes, got {list(inshape)}")
        if len(decoder) < len(encoder):
            raise VoxelMorphError(f"nb_unet_features: the decoder needs at least {len(encoder)} layers, got {decoder}")
        if self.int_steps < 0 or self.int_downsize < 1:
            raise VoxelMorphError(f"int_steps must be >= 0 and int_downsize >= 1, got {int_steps}, {int_downsize}")
        multiple = math.lcm(2 ** len(encoder), self.int_downsize if self.resizes else 1)
        if any(n % multiple for n in self.inshape):
            raise VoxelMorphError(f"inshape {list(self.inshape)}: every size must be a multiple of {multiple}")
        self.unet_model = Unet(encoder, decoder)
        self.flow = nn.Conv3d(self.unet_model.out_channels, 3, kernel_size=3, padding=1)
        with torch.no_grad():
            self.flow.weight.normal_(0.0, FLOW_INIT_STD)
            self.flow.bias.zero_()

    @property
    def resizes(self) -> bool:
        """Whether the velocity is integrated at a lower resolution (VoxelMorph: only when it is integrated)."""
        return self.int_steps > 0 and self.int_downsize > 1

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable: ``VxmDense(**model.config())`` rebuilds the network."""
        return {"inshape": list(self.inshape), "nb_unet_features": [list(f) for f in self.nb_unet_features],
                "int_steps": self.int_steps, "int_downsize": self.int_downsize}

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> VxmDense:
        """Build from a config dict: ours (``config()``) or the authors' (voxelmorph 0.1's ``model.config``).

        Of the package's options only the ones the authors used are supported: features given as
        [[encoder], [decoder]] lists, unet_feat_mult 1, bidir and use_probs False.
        """
        if not isinstance(config, dict):
            raise VoxelMorphError(f"{source}: the VoxelMorph config must be a dict, got {type(config).__name__}")
        config = {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}
        unsupported = {"nb_unet_levels": None, "unet_feat_mult": 1, "bidir": False, "use_probs": False}
        for key, supported in unsupported.items():
            value = config.pop(key, supported)
            if value != supported:
                raise VoxelMorphError(f"{source}: VoxelMorph option {key}={value!r} is not supported "
                                      f"(only {supported!r})")
        known = ("inshape", "nb_unet_features", "int_steps", "int_downsize")
        unknown = sorted(set(config) - set(known))
        if unknown or "inshape" not in config:
            raise VoxelMorphError(f"{source}: unknown VoxelMorph config keys {unknown}" if unknown
                                  else f"{source}: the VoxelMorph config has no 'inshape'")
        try:
            return cls(**config)
        except (TypeError, ValueError) as error:
            raise VoxelMorphError(f"{source}: bad VoxelMorph config: {error}") from None

    def load_weights(self, state: dict, source: str) -> None:
        """Load a state dict with exactly this network's keys and shapes (VoxelMorph's ``.grid`` buffers ignored)."""
        state = {k: v for k, v in state.items() if not k.endswith(".grid")}
        missing, unexpected, wrong = state_dict_mismatch(self.state_dict(), state)
        if missing or unexpected or wrong:
            raise VoxelMorphError(f"{source}: the weights do not fit VxmDense{self.nb_unet_features} (missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]})")
        self.load_state_dict(state)

    def transform(self, image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """VoxelMorph's spatial transformer: sample ``image`` at x + displacement(x), zero outside the image."""
        return warp(image, displacement, mode=mode, padding_mode=PADDING_MODE)

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement (B, 3, *inshape), voxel units, of a velocity (B, 3, *inshape // int_downsize)."""
        if self.int_steps == 0:
            return velocity
        displacement = integrate_velocity(velocity, self.int_steps, padding_mode=PADDING_MODE)
        if self.resizes:
            displacement = resize_flow(displacement, self.inshape, self.int_downsize)
        return displacement

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> VxmOutput:
        """Register ``moving`` to ``fixed``, both (B, 1, *inshape)."""
        if tuple(moving.shape[2:]) != self.inshape or tuple(fixed.shape[2:]) != self.inshape:
            raise VoxelMorphError(f"VxmDense was built for inputs of shape {list(self.inshape)}, got "
                                  f"{list(moving.shape[2:])} and {list(fixed.shape[2:])}")
        velocity = self.flow(self.unet_model(torch.cat([moving, fixed], dim=1)))
        if self.resizes:
            velocity = resize_flow(velocity, [n // self.int_downsize for n in self.inshape], 1.0 / self.int_downsize)
        displacement = self.integrate(velocity)
        return VxmOutput(self.transform(moving, displacement), displacement, velocity)


def read_authors_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``{'config', 'model_state'}`` of the authors' VoxelMorph file: the ``.tar.gz`` or the ``.pt`` inside it.

    Read with ``weights_only=True``; the tarball is checked (utils.archive) and read in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise VoxelMorphError(f"VoxelMorph checkpoint {path} does not exist")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        member, data = read_member(path, ".pt")
        source, stream = f"{path}:{member}", io.BytesIO(data)
    else:
        source, stream = str(path), path
    try:
        checkpoint = torch.load(stream, map_location=map_location, weights_only=True)
    except Exception as error:
        raise VoxelMorphError(f"cannot read VoxelMorph checkpoint {source}: {torch_load_problem(error)}") from None
    if not isinstance(checkpoint, dict) or not {"config", "model_state"} <= set(checkpoint):
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        what = (f"it is a learnsim checkpoint of kind {checkpoint['kind']!r}"
                if isinstance(checkpoint, dict) and "kind" in checkpoint else f"no 'config' and 'model_state' ({keys})")
        raise VoxelMorphError(f"{source}: not an authors' VoxelMorph checkpoint: {what}")
    return checkpoint


def load_authors_voxelmorph(path: str | Path, map_location: str | torch.device = "cpu") -> VxmDense:
    """VxmDense with the weights of the authors' ``.tar.gz`` or ``.pt``, on ``map_location``, in eval mode."""
    checkpoint = read_authors_checkpoint(path, map_location)
    model = VxmDense.from_config(checkpoint["config"], str(path))
    model.load_weights(checkpoint["model_state"], str(path))
    return model.to(map_location).eval()
