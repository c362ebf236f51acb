"""The AHM actor-critics: a light transformer over the patch tokens of an image (`AhmAgent`, our design), and the
authors' fully convolutional agent (`ConvAgent`), chosen with `masking.agent`.

It never runs the MIM encoder: its own strided-conv patch embedding and one or two small transformer
blocks are the whole cost, which is what separates AHM from HPM (whose teacher encodes every patch).
Two per-patch heads: the actor logit z_i (where to mask) and the critic value V_i (the predicted,
per-image normalised reconstruction loss of patch i if it were masked).
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import Conv, Norm
from torch import Tensor, nn

from ahm.errors import AhmError


def _per_axis(patch_size: int | tuple[int, ...], axes: int) -> tuple[int, ...]:
    return (int(patch_size),) * axes if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)


def _compact(patch_size: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """One int when the patch is the same along every axis (as 2D agents always stored it), else one per axis."""
    if isinstance(patch_size, int):
        return int(patch_size)
    sizes = tuple(int(p) for p in patch_size)
    return sizes[0] if len(set(sizes)) == 1 else sizes


def _standardise(images: Tensor) -> Tensor:
    """Per-image standardisation: intensity ranges differ by modality (MRI, CT windows, photos).
    (Mean and mean square, not Tensor.std: the latter is ~100x slower on CPU for this shape.)"""
    x = images.detach().float()
    view = (-1,) + (1,) * (x.dim() - 1)
    x = x - x.flatten(1).mean(dim=1).view(view)
    return x / (x.flatten(1).square().mean(dim=1).sqrt().view(view) + 1e-6)


class _Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # plain attention: at these sizes (tens of tokens) it is several times faster on CPU than the fused kernel
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class AhmAgent(nn.Module):
    """Actor-critic over the L patches of an image or volume: forward(images [B,C,*spatial]) -> (logits [B,L],
    values [B,L]); `grid` is patches per axis (2 or 3 axes), `patch_size` one int or one per axis."""

    def __init__(self, in_channels: int, patch_size: int | tuple[int, ...], grid: tuple[int, ...], dim: int = 64,
                 depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise AhmError(f"--agent-dim ({dim}) must be a positive multiple of --agent-heads ({heads})")
        if depth < 0:
            raise AhmError(f"--agent-depth must be 0 or more, got {depth}")
        self.grid = tuple(int(g) for g in grid)
        self.patch_size = _compact(patch_size)
        self.in_channels = int(in_channels)
        length = math.prod(self.grid)
        conv = Conv[Conv.CONV, len(self.grid)]
        self.patch_embed = conv(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.actor = nn.Linear(dim, 1)
        self.critic = nn.Linear(dim, 1)
        # zero heads: the first policy is uniform (maximum entropy) and the first value is the mean reward, 0
        for head in (self.actor, self.critic):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.patch_embed(_standardise(images))
        if tuple(tokens.shape[2:]) != self.grid:
            raise AhmError(f"agent: images of size {list(images.shape[2:])} give a {list(tokens.shape[2:])} patch grid, "
                           f"the agent was built for {list(self.grid)}")
        tokens = tokens.flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return self.actor(tokens).squeeze(-1), self.critic(tokens).squeeze(-1)

    def init_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild an agent of the same shape (used by A3C worker processes)."""
        return {
            "kind": "transformer",
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "grid": self.grid,
            "dim": self.patch_embed.out_channels,
            "depth": len(self.blocks),
            "heads": self.blocks[0].heads if len(self.blocks) else 1,
        }


def conv_agent_levels(patch_size: int) -> int:
    """How many stride-2 levels take the image to its patch grid: log2(patch size); refused if not a power of two."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise AhmError(
            f"--patch-size {patch_size}: the convolutional agent halves the image once per level down to the patch "
            f"grid, so the patch size must be a power of two (4, 8, 16, 32)"
        )
    return patch_size.bit_length() - 1


def _conv_bn_relu(channels: int, stride: int | tuple[int, ...], spatial_dims: int) -> nn.Sequential:
    return nn.Sequential(
        Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=3, stride=stride, padding=1),
        Norm[Norm.BATCH, spatial_dims](channels),
        nn.ReLU(inplace=True),
    )


class ConvAgent(nn.Module):
    """The authors' agent (AHMN, Xu et al. 2025) rebuilt from its description: a small fully convolutional
    actor-critic whose output maps have one cell per patch.

    Stem: 3x3 conv to `width` channels (no bias) + BN + ReLU6. Trunk: log2(patch) stride-2 3x3 conv-BN-ReLU
    layers (four for 16 px patches: a 320 px image gives a 20x20 grid). Two heads of the same shape, three 3x3
    conv-BN-ReLU layers and a 1x1 conv: the policy logit z (the paper's policy map is sigmoid(z)) and the value,
    which the paper passes through BN + ReLU6 (`value_head="bn-relu6"`, bounded in [0, 6]); `"linear"` leaves it
    unbounded for the joint AHM variant, whose rewards are standardised and so half negative.
    At width 64 and 1 input channel it has 371,396 parameters, as the authors' network does.
    forward(images [B,C,*spatial]) -> (logits [B,L], values [B,L]), L = prod(spatial / patch), row-major.
    In 3D every layer is its 3D counterpart (3x3x3 convolutions); a patch size per axis halves each axis only
    as often as its own patch size asks (each must be a power of two). Under autocast the output layers (each
    head's 1x1 conv, the value's BN + ReLU6) still run in float32.
    """

    def __init__(self, in_channels: int, patch_size: int | tuple[int, ...], grid: tuple[int, ...], width: int = 64,
                 value_head: str = "bn-relu6") -> None:
        super().__init__()
        if value_head not in ("bn-relu6", "linear"):
            raise AhmError(f"agent value head {value_head!r} is not known; choose bn-relu6 or linear")
        self.grid = tuple(int(g) for g in grid)
        self.patch_size = _compact(patch_size)
        self.in_channels = int(in_channels)
        self.width = int(width)
        self.value_head = value_head
        n = len(self.grid)
        conv, norm = Conv[Conv.CONV, n], Norm[Norm.BATCH, n]
        axis_levels = [conv_agent_levels(p) for p in _per_axis(self.patch_size, n)]
        levels = max(axis_levels)
        # an isotropic patch keeps the plain stride 2 (the 2D network as before)
        strides = [2 if len(set(axis_levels)) == 1 else tuple(2 if level < a else 1 for a in axis_levels)
                   for level in range(levels)]
        self.stem = nn.Sequential(
            conv(in_channels, width, kernel_size=3, padding=1, bias=False), norm(width), nn.ReLU6(),
        )
        self.down = nn.Sequential(*(_conv_bn_relu(width, stride, n) for stride in strides))
        self.policy_head = nn.Sequential(*(_conv_bn_relu(width, 1, n) for _ in range(3)), conv(width, 1, 1))
        self.value_trunk = nn.Sequential(*(_conv_bn_relu(width, 1, n) for _ in range(3)), conv(width, 1, 1))
        self.value_out = nn.Sequential(norm(1), nn.ReLU6()) if value_head == "bn-relu6" else nn.Identity()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.detach().float()
        if x.shape[1] != self.in_channels:
            raise AhmError(f"agent: built for {self.in_channels} input channels, got images with {x.shape[1]}")
        feats = self.down(self.stem(x))
        if tuple(feats.shape[2:]) != self.grid:
            size, got, want = ("x".join(map(str, s)) for s in (x.shape[2:], feats.shape[2:], self.grid))
            raise AhmError(
                f"agent: a {size} image gives a {got} map, not the {want} patch grid; use --image-size divisible "
                f"by --patch-size {self.patch_size}"
            )
        policy_feats, value_feats = self.policy_head[:-1](feats), self.value_trunk[:-1](feats)
        # the output layers in float32 under any autocast: masks are a top-k of these logits, and bfloat16's
        # 8-bit mantissa would tie many of them
        with torch.autocast(x.device.type, enabled=False):
            logits = self.policy_head[-1](policy_feats.float()).flatten(1)
            values = self.value_out(self.value_trunk[-1](value_feats.float())).flatten(1)
        return logits, values

    def init_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild an agent of the same shape (A3C worker processes)."""
        return {"kind": "conv", "in_channels": self.in_channels, "patch_size": self.patch_size, "grid": self.grid,
                "width": self.width, "value_head": self.value_head}


AGENT_KINDS = ("transformer", "conv")


def build_agent(kind: str = "transformer", **kwargs: object) -> nn.Module:
    """An agent by kind ("transformer": AhmAgent, "conv": ConvAgent) from its `init_kwargs()` or config."""
    if kind == "transformer":
        return AhmAgent(**kwargs)  # type: ignore[arg-type]
    if kind == "conv":
        return ConvAgent(**kwargs)  # type: ignore[arg-type]
    raise AhmError(f"--agent {kind!r} is not known; choose one of {', '.join(AGENT_KINDS)}")
