"""A small Vision Transformer (class token, pre-norm blocks of ``nn.MultiheadAttention`` and an MLP),
sized for scikit-learn's 8x8 digits and other tiny images.

The defaults (patch 2, token width 32, 2 blocks of 4 heads, MLP hidden width 128) give 17 tokens
(16 patches and the class token) and 420,160 MACs per 8x8 sample as this library counts them
(:func:`~lightning_prune.count_cost`: convolution, linear layers and the attention projections;
the attention products ``QK^T`` and ``AV`` are not counted). The MLP hidden widths
(``blocks.<i>.mlp.fc1``) are the usual thing to prune: ``StructuredPruningCallback(...,
scope="mlp")`` cuts only them (the default for a model with attention also removes whole heads).

Example::

    import torch
    from lightning_prune.models import VisionTransformer

    vit = VisionTransformer()  # 8x8 grey images, 10 classes
    logits = vit(torch.rand(4, 1, 8, 8))  # (4, 10)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TransformerBlock", "TransformerMLP", "VisionTransformer"]


class TransformerMLP(nn.Module):
    """``fc2(GELU(fc1(x)))`` on every token: the feed-forward part of a transformer block.

    Args:
        dim: token width (input and output features).
        hidden: hidden width (``fc1``'s output features, ``fc2``'s input features).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        heads: attention heads (``dim`` must be divisible by it, else ``nn.MultiheadAttention``
            raises ``AssertionError``).
        hidden: MLP hidden width.
        dropout: dropout of the attention weights. Default 0.
    """

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TransformerMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: non-overlapping patches embedded by a strided convolution, a learned class token and
    position embeddings, ``depth`` pre-norm blocks, a final LayerNorm and a linear head on the class
    token. Activations inside the blocks are ``(batch, tokens, features)``, the class token first.

    Args:
        image_size: input height and width. Default 8.
        patch_size: patch height and width; must divide ``image_size``. Default 2.
        in_channels: input channels. Default 1.
        num_classes: output classes. Default 10.
        dim: token width. Default 32.
        depth: number of blocks. Default 2.
        heads: attention heads per block; must divide ``dim``. Default 4.
        mlp_ratio: MLP hidden width as a multiple of ``dim``. Default 4.0 (hidden width 128).
        dropout: dropout of the attention weights. Default 0.

    Raises:
        ValueError: a non-positive size, ``patch_size`` not dividing ``image_size`` or ``heads``
            not dividing ``dim``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
                 "num_classes": num_classes, "dim": dim, "depth": depth, "heads": heads}  # fmt: skip
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"VisionTransformer sizes must be positive integers, got {', '.join(bad)}")
        if image_size % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        hidden = max(1, round(dim * mlp_ratio))
        patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, hidden, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])
