"""The MAE-style ViT: a MONAI ViT encoder on the visible patches and a light transformer decoder, 2D or 3D.

The masked-image-model contract it keeps (MIMOutput, MIMModel, patchify, the masked loss) is in models/mim.py;
the names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import Tensor, nn

from ahm.grid import PatchGrid, sincos_position_table
from ahm.models.mim import (  # noqa: F401  (re-exported: the contract's names were first defined here)
    MIMModel,
    MIMOutput,
    check_image_size,
    gather_tokens,
    grid_patch_loss,
    mask_order,
    masked_patch_loss,
    patchify,
    size_text,
    unpatchify,
)


def sincos_position_embedding(grid: PatchGrid, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sin-cos position table [1, L, dim] of the grid (see `ahm.grid.sincos_position_table`)."""
    return sincos_position_table(grid, dim, temperature).unsqueeze(0)


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


class MAEViT(MIMModel):
    """MAE: a MONAI ViT encoder that sees only the visible patches, and a light transformer decoder.

    `self.encoder` is exactly `monai.networks.nets.ViT(...)`, so its state dict loads into `UNETR(...).vit`.
    Its learnable position embedding starts from the sin-cos table (MAE keeps that table fixed; here it
    stays trainable because UNETR fine-tunes it). The decoder sees the encoded visible tokens plus one
    shared mask token per masked patch, each with a fixed sin-cos position, and predicts the masked
    patches only.
    """

    backbone = "vit"

    def __init__(
        self,
        image_size: int | Sequence[int],
        in_channels: int,
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 3,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        decoder_mlp_dim: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(image_size, patch_size, in_channels, spatial_dims)
        self.hidden_size, self.mlp_dim, self.num_layers, self.num_heads = (
            hidden_size,
            mlp_dim,
            num_layers,
            num_heads,
        )
        self.norm_pix = norm_pix
        self.encoder = ViT(
            in_channels=in_channels,
            img_size=self.patch_grid.spatial_shape,
            patch_size=self.patch_grid.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            classification=False,
            spatial_dims=spatial_dims,
            qkv_bias=False,
        )
        patch_dim = in_channels * self.patch_grid.patch_volume
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
            "decoder_pos", sincos_position_embedding(self.patch_grid, decoder_dim), persistent=False
        )
        self._init_weights()
        freeze_unused_norms(self)

    def _init_weights(self) -> None:
        self.apply(_init_linear)
        embed = self.encoder.patch_embedding
        with torch.no_grad():
            embed.position_embeddings.copy_(sincos_position_embedding(self.patch_grid, self.hidden_size))
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
        return self._encode(self.patch_grid.patchify(images), order, k)

    def _encode(self, patches: Tensor, order: Tensor, k: int) -> Tensor:
        visible_idx = order[:, : self.num_patches - k]
        visible = gather_tokens(patches, visible_idx)
        pos = self.encoder.patch_embedding.position_embeddings.expand(patches.shape[0], -1, -1)
        tokens = self._embed(visible) + gather_tokens(pos, visible_idx)
        return self._encode_tokens(tokens)

    def forward(self, images: Tensor, mask: Tensor, num_masked: int | None = None) -> MIMOutput:
        self._check_input(images, mask)
        order, k = mask_order(mask, num_masked)
        b = images.shape[0]
        patches = self.patch_grid.patchify(images)  # once: the encoder's input and the loss's target
        latent = self.decoder_embed(self._encode(patches, order, k))
        # attention does not care about token order, so the decoder takes [visible..., masked...] with each
        # token's own position added: no scatter back into grid order is needed
        pos = gather_tokens(self.decoder_pos.expand(b, -1, -1), order)
        x = torch.cat([latent, self.mask_token.expand(b, k, -1)], dim=1) + pos
        for block in self.decoder_blocks:
            x = fast_block_forward(block, x)
        pred = self.decoder_pred(self.decoder_norm(x[:, self.num_patches - k :]))
        return grid_patch_loss(pred, images, self.patch_grid, self.norm_pix, order, k, patches)

    def features(self, images: Tensor) -> Tensor:
        """Encoder output [B, L, D] for all patches of the unmasked image."""
        self._check_input(images)
        tokens = (
            self._embed(self.patch_grid.patchify(images)) + self.encoder.patch_embedding.position_embeddings
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
            "patch_size": size_text(self.patch_size),
            "image_size": size_text(self.image_size),
            "in_channels": str(self.in_channels),
            "spatial_dims": str(self.spatial_dims),
        }
