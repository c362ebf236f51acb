"""Masked image modeling: the model interface every masking policy drives, and the MAE-style ViT.

    out = model(images, mask)     # images [B, C, H, W], mask bool [B, L] (True = masked, same K per row)
    out.loss                      # MSE over masked patches (targets per-patch normalised if norm_pix)
    out.per_patch_loss            # [B, L]: each masked patch's mean squared error, 0 on visible patches
    out.prediction                # [B, C, H, W]: predicted pixels on masked patches, input on visible ones
                                  # (built on first read, without gradient: not on the training hot path)

Patch l covers rows (l // cols) * p ... and columns (l % cols) * p ...: row-major over the grid, the order
of MONAI's conv patch embedding. A flattened patch is ordered (channel, row, column), the order of the
conv kernel, so the patch embedding can run as one matmul on the visible patches only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import Tensor, nn

from ahm.config import ModelConfig
from ahm.errors import AhmError

_NORM_PIX_EPS = 1e-6


class MIMOutput:
    """What one masked-image-modeling forward pass returns.

    `prediction` is built only when read (pictures, tests): the training step needs the loss and the
    per-patch loss alone, and scattering the prediction back into image space every step cost time for nothing.
    It is computed without gradient.
    """

    def __init__(self, loss: Tensor, per_patch_loss: Tensor, prediction: Tensor | None = None,
                 build_prediction: Callable[[], Tensor] | None = None) -> None:
        if (prediction is None) == (build_prediction is None):
            raise ValueError("give exactly one of prediction and build_prediction")
        self.loss = loss  # scalar: mean of per_patch_loss over the masked patches
        self.per_patch_loss = per_patch_loss  # [B, L]: mean squared error of each masked patch, 0 elsewhere; grad
        self._prediction = prediction
        self._build = build_prediction

    @property
    def prediction(self) -> Tensor:
        """[B, C, H, W]: de-normalised prediction on masked patches, input pixels elsewhere (no grad)."""
        if self._prediction is None:
            assert self._build is not None
            with torch.no_grad():
                self._prediction = self._build()
            self._build = None
        return self._prediction


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L, C*p*p]: patches row-major over the grid, each flattened (channel, row, col)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * p * p)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: [B, L, C*p*p] -> [B, C, H, W]."""
    b = patches.shape[0]
    p = patch_size
    gh, gw = grid
    x = patches.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, gh * p, gw * p)


def mask_order(mask: Tensor) -> tuple[Tensor, int]:
    """Patch indices [B, L] with the visible ones first, then the masked ones (each ascending), and K.

    Raises ValueError if the rows do not all mask the same number of patches.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, L], got shape {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    low, high = torch.stack([counts.min(), counts.max()]).tolist()  # one device sync, not two
    if low != high:
        raise ValueError("every row of the mask must mask the same number of patches")
    k = int(low)
    # a stable sort of 0/1 keys puts visible (0) before masked (1) and keeps each group ascending
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return order, k


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, D], index [B, N] -> [B, N, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masked_patch_loss(
    pred: Tensor,
    images: Tensor,
    mask: Tensor,
    patch_size: int,
    grid: tuple[int, int],
    norm_pix: bool,
    order: Tensor,
    k: int,
    patches: Tensor | None = None,
) -> MIMOutput:
    """Loss, per-patch loss and (lazily) the image-space prediction from predictions of the K masked patches.

    `pred` is [B, K, C*p*p] for the patches `order[:, L-K:]` (in that order), in normalised units if norm_pix.
    `patches` is `patchify(images, patch_size)` when the caller has it already (it is computed once a step).
    """
    c = images.shape[1]
    b = images.shape[0]
    num_patches = grid[0] * grid[1]
    if patches is None:
        patches = patchify(images, patch_size)
    masked_idx = order[:, num_patches - k :]
    target = gather_tokens(patches, masked_idx)
    mean = std = None
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + _NORM_PIX_EPS).sqrt()
        target_n = (target - mean) / std
    else:
        target_n = target
    loss_k = (pred - target_n).pow(2).mean(dim=-1)  # [B, K]
    per_patch = torch.zeros(b, num_patches, dtype=loss_k.dtype, device=loss_k.device).scatter(
        1, masked_idx, loss_k
    )
    loss = loss_k.mean()

    def build() -> Tensor:
        pixels = pred.detach()
        if norm_pix:
            pixels = pixels * std + mean
        full = patches.detach().scatter(1, masked_idx.unsqueeze(-1).expand_as(pixels), pixels.to(patches.dtype))
        return unpatchify(full, patch_size, grid, c)

    return MIMOutput(loss=loss, per_patch_loss=per_patch, build_prediction=build)


def sincos_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sin-cos position table [1, L, dim] (row-major), zero-padded if dim is not a multiple of 4."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    out_r = rows.reshape(-1, 1) * omega
    out_c = cols.reshape(-1, 1) * omega
    table = torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=1)
    return F.pad(table, (0, dim - table.shape[1])).unsqueeze(0)


def fast_block_forward(block: TransformerBlock, x: Tensor) -> Tensor:
    """A MONAI `TransformerBlock` forward with the block's own weights, attention through SDPA.

    Same maths as `block(x)` for a block built without dropout, cross-attention or relative positions,
    but without the einops rearranges and the explicit attention matrix.
    """
    attn = block.attn
    b, n, _ = x.shape
    h = attn.num_heads
    qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)
    # MONAI splits the qkv features as (qkv, head, head_dim)
    q, k, v = qkv.view(b, n, 3, h, attn.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    y = y.transpose(1, 2).reshape(b, n, attn.inner_dim)
    x = x + attn.out_proj(y)
    mlp = block.mlp
    return x + mlp.linear2(mlp.fn(mlp.linear1(block.norm2(x))))


def freeze_unused_norms(module: nn.Module) -> None:
    """Stop MONAI's never-used `norm_cross_attn` LayerNorms from asking for gradients.

    Every MONAI TransformerBlock holds one even without cross-attention; left trainable it gets no gradient,
    which DistributedDataParallel reports as an error. The keys stay in the state dict.
    """
    for block in module.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)


def _init_linear(module: nn.Module) -> None:
    # MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MIMModel(nn.Module):
    """Base of the masked-image-modeling models a masking policy drives."""

    backbone: str = ""

    def __init__(self, image_size: int, patch_size: int, in_channels: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]

    def _check_input(self, images: Tensor, mask: Tensor | None = None) -> None:
        if (
            images.dim() != 4
            or images.shape[1] != self.in_channels
            or tuple(images.shape[2:]) != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        if mask is not None and (
            mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], self.num_patches)
        ):
            raise ValueError(
                f"expected a bool mask [{images.shape[0]}, {self.num_patches}], got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )

    def forward(self, images: Tensor, mask: Tensor) -> MIMOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        """Per-patch features [B, L, D] of the whole, unmasked image."""
        raise NotImplementedError

    def export_encoder(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        """The weights a segmenter starts from."""
        raise NotImplementedError

    def encoder_metadata(self) -> dict[str, str]:  # pragma: no cover - interface
        """What a segmenter must match to load `export_encoder()` (all values strings)."""
        raise NotImplementedError


class MAEViT(MIMModel):
    """MAE: a MONAI ViT encoder that sees only the visible patches, and a light transformer decoder.

    `self.encoder` is exactly `monai.networks.nets.ViT(...)`, so its state dict loads into `UNETR(...).vit`.
    Its learnable position embedding starts from the 2D sin-cos table (MAE keeps that table fixed; here it
    stays trainable because UNETR fine-tunes it). The decoder sees the encoded visible tokens plus one
    shared mask token per masked patch, each with a fixed sin-cos position, and predicts the masked
    patches only.
    """

    backbone = "vit"

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        patch_size: int = 16,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 3,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        decoder_mlp_dim: int | None = None,
    ) -> None:
        super().__init__(image_size, patch_size, in_channels)
        self.hidden_size, self.mlp_dim, self.num_layers, self.num_heads = (
            hidden_size,
            mlp_dim,
            num_layers,
            num_heads,
        )
        self.norm_pix = norm_pix
        self.encoder = ViT(
            in_channels=in_channels,
            img_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            classification=False,
            spatial_dims=2,
            qkv_bias=False,
        )
        patch_dim = in_channels * patch_size * patch_size
        self.decoder_embed = nn.Linear(hidden_size, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [
                TransformerBlock(decoder_dim, decoder_mlp_dim or 4 * decoder_dim, decoder_heads, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        self.register_buffer(
            "decoder_pos", sincos_position_embedding(self.grid, decoder_dim), persistent=False
        )
        self._init_weights()
        freeze_unused_norms(self)

    def _init_weights(self) -> None:
        self.apply(_init_linear)
        embed = self.encoder.patch_embedding
        with torch.no_grad():
            embed.position_embeddings.copy_(sincos_position_embedding(self.grid, self.hidden_size))
            # the conv patch embedding is a linear map on flattened patches: initialise it like one
            w = embed.patch_embeddings.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.patch_embeddings.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def _embed(self, patches: Tensor) -> Tensor:
        conv = self.encoder.patch_embedding.patch_embeddings
        return F.linear(patches, conv.weight.view(conv.weight.shape[0], -1), conv.bias)

    def _encode_tokens(self, tokens: Tensor) -> Tensor:
        for block in self.encoder.blocks:
            tokens = fast_block_forward(block, tokens)
        return self.encoder.norm(tokens)

    def encode_visible(self, images: Tensor, mask: Tensor) -> Tensor:
        """Encoder output [B, L-K, D] of the visible patches (ascending index); masked pixels never enter."""
        self._check_input(images, mask)
        order, k = mask_order(mask)
        return self._encode(patchify(images, self.patch_size), order, k)

    def _encode(self, patches: Tensor, order: Tensor, k: int) -> Tensor:
        visible_idx = order[:, : self.num_patches - k]
        visible = gather_tokens(patches, visible_idx)
        pos = self.encoder.patch_embedding.position_embeddings.expand(patches.shape[0], -1, -1)
        tokens = self._embed(visible) + gather_tokens(pos, visible_idx)
        return self._encode_tokens(tokens)

    def forward(self, images: Tensor, mask: Tensor) -> MIMOutput:
        self._check_input(images, mask)
        order, k = mask_order(mask)
        b = images.shape[0]
        patches = patchify(images, self.patch_size)  # once: the encoder's input and the loss's target
        latent = self.decoder_embed(self._encode(patches, order, k))
        # attention does not care about token order, so the decoder takes [visible..., masked...] with each
        # token's own position added: no scatter back into grid order is needed
        pos = gather_tokens(self.decoder_pos.expand(b, -1, -1), order)
        x = torch.cat([latent, self.mask_token.expand(b, k, -1)], dim=1) + pos
        for block in self.decoder_blocks:
            x = fast_block_forward(block, x)
        pred = self.decoder_pred(self.decoder_norm(x[:, self.num_patches - k :]))
        return masked_patch_loss(pred, images, mask, self.patch_size, self.grid, self.norm_pix, order, k, patches)

    def features(self, images: Tensor) -> Tensor:
        """Encoder output [B, L, D] for all patches of the unmasked image."""
        self._check_input(images)
        tokens = (
            self._embed(patchify(images, self.patch_size)) + self.encoder.patch_embedding.position_embeddings
        )
        return self._encode_tokens(tokens)

    def export_encoder(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def encoder_metadata(self) -> dict[str, str]:
        return {
            "backbone": self.backbone,
            "hidden_size": str(self.hidden_size),
            "mlp_dim": str(self.mlp_dim),
            "num_layers": str(self.num_layers),
            "num_heads": str(self.num_heads),
            "patch_size": str(self.patch_size),
            "image_size": str(self.image_size),
            "in_channels": str(self.in_channels),
        }


def check_image_size(image_size: int, patch_size: int) -> None:
    """AhmError unless the image splits into whole patches."""
    if image_size % patch_size:
        raise AhmError(
            f"--image-size {image_size} is not divisible by --patch-size {patch_size}: "
            f"choose an image size that is a multiple of the patch size"
        )


def build_mim_model(model_cfg: ModelConfig, image_size: int, in_channels: int) -> MIMModel:
    """The MIM model for `model_cfg.backbone` ("vit": MAEViT, "unet": MaskedUNet)."""
    if in_channels < 1:
        raise AhmError(f"--channels must be at least 1, got {in_channels}")
    check_image_size(image_size, model_cfg.patch_size)
    if model_cfg.backbone == "unet":
        from ahm.models.unet_mim import MaskedUNet

        return MaskedUNet(model_cfg, image_size, in_channels)
    if model_cfg.backbone != "vit":
        raise AhmError(f"model backbone {model_cfg.backbone!r} is not known; choose vit or unet")
    dims = model_cfg.vit_dims()
    if model_cfg.decoder_dim % model_cfg.decoder_heads:
        raise AhmError(
            f"model.decoder_dim {model_cfg.decoder_dim} must be divisible by "
            f"model.decoder_heads {model_cfg.decoder_heads}"
        )
    return MAEViT(
        image_size=image_size,
        in_channels=in_channels,
        patch_size=model_cfg.patch_size,
        norm_pix=model_cfg.norm_pix,
        decoder_dim=model_cfg.decoder_dim,
        decoder_depth=model_cfg.decoder_depth,
        decoder_heads=model_cfg.decoder_heads,
        decoder_mlp_dim=model_cfg.decoder_dims()["decoder_mlp_dim"],
        **dims,
    )
