"""A small Vision Transformer as MoCo v3 trains it: a frozen random patch projection (the paper's
stability trick), a fixed 2-D sin-cos position embedding, a [CLS] token, pre-norm blocks and a final
LayerNorm. The output is the [CLS] token after the final LayerNorm: NxD.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# name -> (embed_dim, depth, num_heads); MoCo v3's vit_small uses 12 heads.
PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 12),
    "vit_base": (768, 12, 12),
}


def sincos_position_embedding_2d(
    grid_size: int, embed_dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(1+G*G)xD fixed embedding; row 0 (the [CLS] token) is zero, as in MoCo v3's vits.py."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # D/4
    out_w = grid_w.flatten()[:, None] * omega[None]  # G*G x D/4
    out_h = grid_h.flatten()[:, None] * omega[None]
    patches = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # G*G x D
    return torch.cat([torch.zeros(1, embed_dim), patches], dim=0)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        freeze_patch_embed: bool = True,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        grid = image_size // patch_size
        self.feature_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        # MoCo v3: uniform init as for a linear layer of fan_in 3*p*p (here C*p*p), then frozen
        bound = math.sqrt(6.0 / float(in_channels * patch_size * patch_size + embed_dim))
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        if freeze_patch_embed:
            self.patch_embed.weight.requires_grad_(False)
            self.patch_embed.bias.requires_grad_(False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.register_buffer("pos_embed", sincos_position_embedding_2d(grid, embed_dim)[None])  # 1xTxD
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # Nx(G*G)xD
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # Nx1xD
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed  # NxTxD
        return self.norm(self.blocks(tokens))[:, 0]  # NxD


def build_vit(
    arch: str,
    in_channels: int = 3,
    image_size: int = 224,
    patch_size: int = 16,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    freeze_patch_embed: bool = True,
) -> VisionTransformer:
    """A preset (vit_tiny/small/base) whose embed_dim/depth/num_heads may be overridden."""
    if arch not in PRESETS:
        raise ValueError(f"unknown ViT {arch!r}: expected one of {sorted(PRESETS)}")
    preset_dim, preset_depth, preset_heads = PRESETS[arch]
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        embed_dim=embed_dim or preset_dim,
        depth=depth or preset_depth,
        num_heads=num_heads or preset_heads,
        mlp_ratio=mlp_ratio,
        freeze_patch_embed=freeze_patch_embed,
    )
