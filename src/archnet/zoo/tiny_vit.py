"""A small Vision Transformer for 32x32 inputs: timm's own ``VisionTransformer``, scaled down.

It is timm's class (not a look-alike) so the demo converts what users convert: timm's blocks,
attention, LayerNorm, patch embedding, class token and pooling.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from archnet.zoo.registry import register_model

__all__ = ["tiny_vit"]


@register_model
def tiny_vit(num_classes: int = 10, **kwargs) -> VisionTransformer:
    """Patch 4 on 32x32 (64 patches and a class token), width 64, 6 blocks of 4 heads, MLP
    ratio 2, token-average pooling: ~0.2 M parameters, trained here in minutes on two cores."""
    cfg = {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 6,
        "num_heads": 4,
        "mlp_ratio": 2.0,
        "global_pool": "avg",
        **kwargs,
    }
    return VisionTransformer(num_classes=num_classes, **cfg)
