"""Tiny random configs of every AutoBackbone family CPSL supports (shared by the modeling, checkpoint and trainer
tests). Four layers / stages, widths of 8-32: each model has well under 100k parameters."""

from __future__ import annotations

from typing import Any

from cpsl_hf import CPSLConfig

TINY_BACKBONES: dict[str, dict[str, Any]] = {
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "image_size": 28,
    },
    "dinov2_with_registers": {
        "model_type": "dinov2_with_registers",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "image_size": 28,
        "num_register_tokens": 2,
    },
    "dinov3_vit": {
        "model_type": "dinov3_vit",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 16,
        "num_register_tokens": 2,
    },
    "convnext": {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    "convnextv2": {"model_type": "convnextv2", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    "dinov3_convnext": {
        "model_type": "dinov3_convnext",
        "hidden_sizes": [8, 16, 24, 32],
        "depths": [1, 1, 1, 1],
    },
    "swinv2": {
        "model_type": "swinv2",
        "embed_dim": 8,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 1],
        "window_size": 4,
    },
    "swin": {
        "model_type": "swin",
        "embed_dim": 8,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 1],
        "window_size": 4,
    },
}
PLAIN_VITS = ("dinov2", "dinov2_with_registers", "dinov3_vit")


def tiny_backbone_config(family: str, **overrides: Any) -> CPSLConfig:
    """CPSLConfig with the tiny ``family`` backbone, its four levels (layers/stages 1-4), a SegFormer head of width
    32 and (ViTs) a 16-channel pyramid; ``overrides`` are CPSLConfig fields."""
    backbone = {**TINY_BACKBONES[family], "out_indices": [1, 2, 3, 4]}
    defaults: dict[str, Any] = {"embedding_dim": 32}
    if family in PLAIN_VITS:
        defaults["pyramid_channels"] = 16
    return CPSLConfig(backbone_config=backbone, **{**defaults, **overrides})
