"""Configuration of the CPSL segmentation model (backbone + decode head + self-labeling head).

This file travels with every saved checkpoint as remote code (``trust_remote_code=True``), so it imports only
``transformers`` (and, through the modeling file, ``torch``).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Cityscapes train-id order (19 classes). Kept here, not imported from ``cpsl_hf.data``, because this file must
# load without the package installed. ``tests/test_modeling.py`` checks it against ``cpsl_hf.data.protocols``.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
_DROPPED_FOR_16 = ("terrain", "truck", "train")
_DROPPED_FOR_13 = _DROPPED_FOR_16 + ("wall", "fence", "pole")

PLAIN_VIT_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
"""``AutoBackbone`` families that are plain ViTs: one stride-p token map per layer, turned into strides 4, 8, 16
and 32 by the simple feature pyramid (ViTDet)."""

HIERARCHICAL_TYPES = ("convnext", "convnextv2", "dinov3_convnext", "swin", "swinv2")
"""``AutoBackbone`` families with four stages at strides 4, 8, 16 and 32 (stage1 ... stage4)."""

AUTOBACKBONE_HEADS = ("segformer", "upernet")
"""Decode heads of ``AutoBackbone`` families; the first one is the default."""

DECODE_HEADS = {
    "segformer": ("segformer",),
    "resnet": ("proda", "deeplabv2"),
    **{model_type: AUTOBACKBONE_HEADS for model_type in PLAIN_VIT_TYPES + HIERARCHICAL_TYPES},
}
"""Decode heads available for each backbone ``model_type``; the first one is the default."""

PYRAMID_STRIDES = (4, 8, 16, 32)
"""Strides of the four feature maps every backbone hands the decode head (ResNet apart)."""

RESNET_OUTPUT_STRIDES = (8, 16, 32)

SEGFORMER_EMBEDDINGS = ("pre_activation", "post_activation")
"""Where the SegFormer head's pixel embedding is read: before or after the ReLU of its fuse layer."""

_MIT_COMMON: dict[str, Any] = {
    "num_encoder_blocks": 4,
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
    "drop_path_rate": 0.1,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout_prob": 0.1,
    "layer_norm_eps": 1e-6,
}


def _mit(hidden_sizes: list[int], depths: list[int], heads: list[int], decoder: int) -> dict[str, Any]:
    return {
        "model_type": "segformer",
        **_MIT_COMMON,
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "num_attention_heads": heads,
        "decoder_hidden_size": decoder,
    }


_MIT_HEADS = [1, 2, 5, 8]
_MIT_WIDE = [64, 128, 320, 512]


def _vit(model_type: str, hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    """A plain-ViT backbone config whose four pyramid levels read layers L/4, L/2, 3L/4 and L (1-based), as the
    BEiT / DINOv2 segmentation heads do."""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "out_indices": default_out_indices(model_type, layers),
        **extra,
    }


def _dinov2(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "backbone_config": _vit("dinov2", hidden, layers, heads, mlp_ratio=4, patch_size=14, image_size=518)
    }


def _dinov3(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    backbone = _vit(
        "dinov3_vit",
        hidden,
        layers,
        heads,
        intermediate_size=4 * hidden,
        patch_size=16,
        num_register_tokens=4,
    )
    return {"backbone_config": backbone}


def _convnext(hidden_sizes: list[int], depths: list[int]) -> dict[str, Any]:
    backbone = {"model_type": "convnext", "hidden_sizes": hidden_sizes, "depths": depths}
    return {"backbone_config": {**backbone, "out_indices": [1, 2, 3, 4]}}


def _swin(embed_dim: int, depths: list[int], heads: list[int]) -> dict[str, Any]:
    backbone = {"model_type": "swin", "embed_dim": embed_dim, "depths": depths, "num_heads": heads}
    return {"backbone_config": {**backbone, "window_size": 7, "out_indices": [1, 2, 3, 4]}}


def default_out_indices(model_type: str, num_layers: int) -> list[int]:
    """The levels CPSL reads from an ``AutoBackbone`` by default (indices into its ``stage_names``, 0 the stem):
    stages 1-4 of a hierarchical backbone; layers L/4, L/2, 3L/4, L of a plain ViT with L layers."""
    if model_type in PLAIN_VIT_TYPES:
        return [max(1, round(num_layers * quarter / 4)) for quarter in (1, 2, 3, 4)]
    return [1, 2, 3, 4]


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.85M parameters: the CPU demo / test size.
    "segformer-tiny": {"backbone_config": _mit([16, 32, 64, 128], [2, 2, 2, 2], [1, 2, 4, 8], 128)},
    # The published MiT encoders (nvidia/mit-b0 ... nvidia/mit-b5) with the SegFormer decoder widths.
    "segformer-b0": {"backbone_config": _mit([32, 64, 160, 256], [2, 2, 2, 2], _MIT_HEADS, 256)},
    "segformer-b1": {"backbone_config": _mit(_MIT_WIDE, [2, 2, 2, 2], _MIT_HEADS, 256)},
    "segformer-b2": {"backbone_config": _mit(_MIT_WIDE, [3, 4, 6, 3], _MIT_HEADS, 768)},
    "segformer-b3": {"backbone_config": _mit(_MIT_WIDE, [3, 4, 18, 3], _MIT_HEADS, 768)},
    "segformer-b4": {"backbone_config": _mit(_MIT_WIDE, [3, 8, 27, 3], _MIT_HEADS, 768)},
    "segformer-b5": {"backbone_config": _mit(_MIT_WIDE, [3, 6, 40, 3], _MIT_HEADS, 768)},
    # DeepLab-V2: ResNet-101 (microsoft/resnet-101 layout) dilated to output stride 8, ProDA/CPSL ASPP head.
    "deeplabv2-r101": {
        "backbone_config": {
            "model_type": "resnet",
            "embedding_size": 64,
            "hidden_sizes": [256, 512, 1024, 2048],
            "depths": [3, 4, 23, 3],
            "layer_type": "bottleneck",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False,
        },
        "decode_head": "proda",
        "embedding_dim": 256,
        "output_stride": 8,
    },
    # Foundation models through AutoBackbone (facebook/dinov2-*, facebook/dinov3-vit*16-pretrain-lvd1689m,
    # facebook/convnext-*-224, microsoft/swin-*-patch4-window7-224), SegFormer head of width 256 by default.
    "dinov2-small": _dinov2(384, 12, 6),
    "dinov2-base": _dinov2(768, 12, 12),
    "dinov2-large": _dinov2(1024, 24, 16),
    "dinov3-vits16": _dinov3(384, 12, 6),
    "dinov3-vitb16": _dinov3(768, 12, 12),
    "dinov3-vitl16": _dinov3(1024, 24, 16),
    "convnext-tiny": _convnext([96, 192, 384, 768], [3, 3, 9, 3]),
    "convnext-base": _convnext([128, 256, 512, 1024], [3, 3, 27, 3]),
    "convnext-large": _convnext([192, 384, 768, 1536], [3, 3, 27, 3]),
    "swin-tiny": _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin-base": _swin(128, [2, 2, 18, 2], [4, 8, 16, 32]),
}
"""Named sizes for :meth:`CPSLConfig.from_preset`."""


def default_class_names(num_labels: int) -> list[str] | None:
    """Cityscapes class names of the 19-, 16- (SYNTHIA) and 13-class protocols; ``None`` for other sizes."""
    if num_labels == 19:
        return list(CITYSCAPES_CLASSES)
    if num_labels == 16:
        return [name for name in CITYSCAPES_CLASSES if name not in _DROPPED_FOR_16]
    if num_labels == 13:
        return [name for name in CITYSCAPES_CLASSES if name not in _DROPPED_FOR_13]
    return None


class CPSLConfig(PreTrainedConfig):
    r"""Configuration of :class:`CPSLForSemanticSegmentation`.

    The backbone is a nested config whose ``model_type`` selects the architecture:

    - ``SegformerConfig``: MiT encoder + SegFormer all-MLP decode head (``decode_head="segformer"``); logits and
      embeddings at stride 4; the embedding is the fused ``decoder_hidden_size``-dim feature before the classifier.
    - ``ResNetConfig``: DeepLab-V2 ResNet with stages 3 and 4 dilated to ``output_stride`` 8, followed by
      ``decode_head="proda"`` (default; ProDA/CPSL ASPP: 1x1 + four dilated 3x3 branches, each
      ``embedding_dim``-wide with GroupNorm, concatenated, squeeze-excitation, 3x3 fuse conv + GroupNorm gives the
      ``embedding_dim``-dim embedding, a 1x1 conv the logits) or ``decode_head="deeplabv2"`` (the original ASPP:
      four parallel dilated 3x3 convs summed into logits; it has no hidden layer, so its embedding is the
      backbone's last feature map, ``hidden_sizes[-1]``-dim, the input of that linear classifier).
    - Any ``AutoBackbone`` config of the families in ``PLAIN_VIT_TYPES`` (``dinov2``, ``dinov2_with_registers``,
      ``dinov3_vit``) or ``HIERARCHICAL_TYPES`` (``convnext``, ``convnextv2``, ``dinov3_convnext``, ``swin``,
      ``swinv2``), built with
      ``AutoBackbone.from_config``; its ``out_indices`` / ``out_features`` choose the levels. A hierarchical
      backbone hands its four stages (strides 4, 8, 16, 32) to the decode head. A plain ViT's levels (one stride-p
      token map per chosen layer, 1 or 4 layers) go through the simple feature pyramid of ViTDet (Li et al. 2022):
      deconvolutions x4 and x2, identity and 2x2 max pooling, then a 1x1 and a 3x3 conv to ``pyramid_channels``
      (each followed by a channel LayerNorm), resized to strides 4, 8, 16, 32 when p is not 16 (p = 14). The
      input is zero-padded (the mean colour, after normalisation) on the bottom and right to a multiple of p (ViT)
      or 32 (hierarchical) and every level cropped back to ceil(H / s) x ceil(W / s). The SegFormer all-MLP head
      (``decode_head="segformer"``) of width ``embedding_dim`` (default 256) fuses the four levels at stride 4;
      or ``decode_head="upernet"``: transformers' ``UperNetHead`` (PSP on the deepest level with
      ``upernet_pool_scales``, FPN laterals and a 3x3 fuse, ``embedding_dim`` channels, default 512) whose pixel
      embedding is the fuse's BatchNorm output before its ReLU (signed); the classifier reads the ReLU output.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*): ``SegformerConfig``, ``ResNetConfig`` or an
            ``AutoBackbone`` config listed above (or their dict form with ``model_type``). Defaults to
            ``SegformerConfig()``.
        decode_head (`str`, *optional*): ``"segformer"`` (SegFormer and AutoBackbone backbones), ``"upernet"``
            (AutoBackbone backbones), ``"proda"`` or ``"deeplabv2"`` (ResNet backbones). Defaults to the first of
            these for the backbone.
        upernet_pool_scales (`list[int]`, *optional*, defaults to `[1, 2, 3, 6]`): pooling grids of the UperNet
            head's pyramid pooling module.
        embedding_dim (`int`, *optional*): D, the width of the pixel embedding used by the self-labeling head.
            Fixed by the backbone for ``segformer`` (``decoder_hidden_size``) and ``deeplabv2``
            (``hidden_sizes[-1]``); free for ``proda`` (default 256, a multiple of 32 for GroupNorm) and for the
            SegFormer head of an AutoBackbone (default 256, the head's ``decoder_hidden_size``) and the UperNet
            head (default 512, its ``hidden_size``).
        pyramid_channels (`int`, *optional*): width of the simple feature pyramid of a plain ViT (default 256, as
            ViTDet); ``None`` for other backbones.
        output_stride (`int`, *optional*): stride of logits/embeddings w.r.t. the input: always 4 for SegFormer
            and AutoBackbone families;
            8 (default, stages 3 and 4 dilated by 2 and 4), 16 (stage 4 dilated by 2) or 32 for ResNet.
        aspp_dilations (`list[int]`, *optional*, defaults to `[6, 12, 18, 24]`): dilation rates of the ASPP.
        classifier_dropout_prob (`float`, *optional*, defaults to 0.1): dropout before the 1x1 classifier of the
            ``segformer`` and ``proda`` heads.
        segformer_embedding (`str`, *optional*, defaults to `"post_activation"`): the ``segformer`` head's pixel
            embedding (what the self-labeling head reads): ``"post_activation"``, the ReLU output of the fuse
            layer that the classifier reads (non-negative: every cosine between two embeddings is >= 0), or
            ``"pre_activation"``, its BatchNorm output before the ReLU (signed, like the GroupNorm output of the
            reference's ProDA head). Measured on the built-in shift, the signed embedding clusters no better
            (BENCHMARKS.md). The logits are the same either way.
        sl_temperature (`float`, *optional*, defaults to 0.08): tau of the self-labeling cosine classifier.
        ignore_index (`int`, *optional*, defaults to 255): label ignored by the cross-entropy loss.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of head weights.
        num_labels / id2label / label2id: classes; Cityscapes names by default for 19, 16 and 13 classes.
    """

    model_type = "cpsl"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="segformer"),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    decode_head: str | None = None
    embedding_dim: int | None = None
    pyramid_channels: int | None = None
    output_stride: int | None = None
    aspp_dilations: list[int] | tuple[int, ...] = (6, 12, 18, 24)
    upernet_pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    classifier_dropout_prob: float = 0.1
    segformer_embedding: str = "post_activation"
    sl_temperature: float = 0.08
    ignore_index: int = 255
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.id2label is None:
            num_labels = kwargs.get("num_labels", 19)
            names = default_class_names(num_labels)
            if names is not None:
                self.id2label = dict(enumerate(names))
        super().__post_init__(**kwargs)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {name: index for index, name in self.id2label.items()}
        self.aspp_dilations = list(self.aspp_dilations)
        self.upernet_pool_scales = list(self.upernet_pool_scales)
        self._resolve_architecture()

    # ------------------------------------------------------------------ validation
    @property
    def backbone_type(self) -> str:
        """``"segformer"``, ``"resnet"`` or an ``AutoBackbone`` family (``"dinov2"``, ``"swin"`` ...): the
        ``model_type`` of ``backbone_config``."""
        return self.backbone_config.model_type

    @property
    def is_autobackbone(self) -> bool:
        """True when the backbone is built by ``AutoBackbone`` (every family but SegFormer and ResNet)."""
        return self.backbone_type in PLAIN_VIT_TYPES + HIERARCHICAL_TYPES

    @property
    def is_plain_vit(self) -> bool:
        """True for plain ViTs (``PLAIN_VIT_TYPES``), whose levels go through the simple feature pyramid."""
        return self.backbone_type in PLAIN_VIT_TYPES

    @property
    def backbone_level_channels(self) -> list[int]:
        """Channels of the four maps (strides 4, 8, 16, 32) the SegFormer head reads: the MiT ``hidden_sizes``,
        the chosen stages of a hierarchical ``AutoBackbone``, or ``pyramid_channels`` four times for a ViT."""
        backbone = self.backbone_config
        if self.backbone_type == "segformer":
            return list(backbone.hidden_sizes)
        if self.is_plain_vit:
            return [self.pyramid_channels] * len(PYRAMID_STRIDES)
        return [_stage_channels(backbone)[index] for index in backbone.out_indices]

    def _resolve_architecture(self) -> None:
        backbone_type = self.backbone_type
        if backbone_type not in DECODE_HEADS:
            raise ValueError(
                f"CPSLConfig: backbone_config has model_type={backbone_type!r}; supported backbones are "
                f"{sorted(DECODE_HEADS)} (SegformerConfig, ResNetConfig or one of these AutoBackbone configs)."
            )
        heads = DECODE_HEADS[backbone_type]
        if self.decode_head is None:
            self.decode_head = heads[0]
        if self.decode_head not in heads:
            raise ValueError(
                f"CPSLConfig: decode_head={self.decode_head!r} does not fit a {backbone_type} backbone; "
                f"choose one of {list(heads)}."
            )
        backbone = self.backbone_config
        if self.is_autobackbone:
            self._resolve_autobackbone()
        elif self.pyramid_channels is not None:
            raise ValueError(
                f"CPSLConfig: pyramid_channels={self.pyramid_channels} is only for plain ViT backbones "
                f"{list(PLAIN_VIT_TYPES)}, not {backbone_type}."
            )
        if self.is_autobackbone:
            fixed_dim, fixed_reason = None, None
        elif self.decode_head == "segformer":
            fixed_dim, fixed_reason = backbone.decoder_hidden_size, "backbone_config.decoder_hidden_size"
        elif self.decode_head == "deeplabv2":
            fixed_dim, fixed_reason = backbone.hidden_sizes[-1], "backbone_config.hidden_sizes[-1]"
        else:
            fixed_dim, fixed_reason = None, None
        if fixed_dim is not None:
            if self.embedding_dim is not None and self.embedding_dim != fixed_dim:
                raise ValueError(
                    f"CPSLConfig: embedding_dim={self.embedding_dim} but the {self.decode_head!r} head's embedding "
                    f"is {fixed_reason}={fixed_dim}; leave embedding_dim unset or change the backbone."
                )
            self.embedding_dim = fixed_dim
        else:
            if self.embedding_dim is None:
                self.embedding_dim = 512 if self.decode_head == "upernet" else 256
            if self.is_autobackbone:
                if self.embedding_dim <= 0:
                    raise ValueError(f"CPSLConfig: embedding_dim={self.embedding_dim} must be positive.")
            elif self.embedding_dim <= 0 or self.embedding_dim % 32 != 0:
                raise ValueError(
                    f"CPSLConfig: embedding_dim={self.embedding_dim} must be a positive multiple of 32 for the "
                    "'proda' head (GroupNorm with 32 groups)."
                )
        if backbone_type == "segformer" or self.is_autobackbone:
            if self.output_stride not in (None, 4):
                raise ValueError(
                    f"CPSLConfig: output_stride={self.output_stride} is not possible for "
                    f"{_FAMILY_NAMES[backbone_type]} (its decode head always works at stride 4)."
                )
            self.output_stride = 4
        else:
            if self.output_stride is None:
                self.output_stride = 8
            if self.output_stride not in RESNET_OUTPUT_STRIDES:
                raise ValueError(
                    f"CPSLConfig: output_stride={self.output_stride} for a ResNet backbone must be one of "
                    f"{RESNET_OUTPUT_STRIDES}."
                )
            if len(backbone.hidden_sizes) != 4:
                raise ValueError("CPSLConfig: a ResNet backbone must have 4 stages (backbone_config.depths).")
        if self.segformer_embedding not in SEGFORMER_EMBEDDINGS:
            raise ValueError(
                f"CPSLConfig: segformer_embedding={self.segformer_embedding!r}; choose one of "
                f"{list(SEGFORMER_EMBEDDINGS)}."
            )
        if not self.sl_temperature > 0:
            raise ValueError(f"CPSLConfig: sl_temperature={self.sl_temperature} must be > 0.")

    def _resolve_autobackbone(self) -> None:
        """Check the levels an ``AutoBackbone`` hands over and default ``pyramid_channels``."""
        backbone = self.backbone_config
        levels = list(backbone.out_indices)
        if self.is_plain_vit:
            if len(levels) not in (1, 4) or 0 in levels:
                raise ValueError(
                    f"CPSLConfig: a {self.backbone_type} backbone needs 1 layer (ViTDet: all four pyramid levels "
                    f"from it) or 4 layers (one per level) in backbone_config.out_indices, got {levels} (stage "
                    f"names {backbone.stage_names}; 0 is the patch embedding); e.g. "
                    f"{default_out_indices(self.backbone_type, backbone.num_hidden_layers)}."
                )
            if self.pyramid_channels is None:
                self.pyramid_channels = 256
            if self.pyramid_channels <= 0:
                raise ValueError(f"CPSLConfig: pyramid_channels={self.pyramid_channels} must be positive.")
            return
        if self.pyramid_channels is not None:
            raise ValueError(
                f"CPSLConfig: pyramid_channels={self.pyramid_channels} is only for plain ViT backbones "
                f"{list(PLAIN_VIT_TYPES)}, not {self.backbone_type}."
            )
        if levels != [1, 2, 3, 4]:
            raise ValueError(
                f"CPSLConfig: a {self.backbone_type} backbone must hand over its four stages (strides 4, 8, 16, "
                f"32): backbone_config.out_indices must be [1, 2, 3, 4], got {levels}."
            )

    @property
    def resnet_stage_dilations(self) -> list[int]:
        """Dilation of each of the 4 ResNet stages (strides of dilated stages become 1), e.g. [1, 1, 2, 4]."""
        return {8: [1, 1, 2, 4], 16: [1, 1, 1, 2], 32: [1, 1, 1, 1]}[self.output_stride]

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(
        cls, name: str, num_labels: int = 19, id2label: dict[int, str] | None = None, **overrides: Any
    ) -> CPSLConfig:
        """Config of a named size (see ``PRESETS``): ``segformer-tiny``, ``segformer-b0`` ... ``segformer-b5``,
        ``deeplabv2-r101``, ``dinov2-small|base|large``, ``dinov3-vits16|vitb16|vitl16``,
        ``convnext-tiny|base|large``, ``swin-tiny|base``.

        Args:
            name: preset name.
            num_labels: number of classes C (19, 16 and 13 get Cityscapes names).
            id2label: class names, overriding the defaults; its length must equal ``num_labels``.
            overrides: ``CPSLConfig`` fields (``decode_head="deeplabv2"``, ``sl_temperature=0.1``, ...) or fields of
                the backbone config (``drop_path_rate=0.0``, ``decoder_hidden_size=256``, ...), routed by name.
        """
        if name not in PRESETS:
            raise ValueError(
                f"CPSLConfig.from_preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}."
            )
        if id2label is not None and len(id2label) != num_labels:
            raise ValueError(
                f"CPSLConfig.from_preset: id2label has {len(id2label)} entries but num_labels={num_labels}."
            )
        preset = copy.deepcopy(PRESETS[name])
        top_level, backbone_overrides = cls.route_overrides(
            preset["backbone_config"]["model_type"], overrides
        )
        if "out_features" in backbone_overrides:  # it replaces the preset's out_indices (both must agree)
            preset["backbone_config"].pop("out_indices", None)
        preset["backbone_config"].update(backbone_overrides)
        preset.update(top_level)
        if id2label is not None:
            preset["id2label"] = {int(key): value for key, value in id2label.items()}
        return cls(num_labels=num_labels, **preset)

    @classmethod
    def route_overrides(cls, backbone_model_type: str, overrides: dict[str, Any]) -> tuple[dict, dict]:
        """Split keyword overrides into (CPSLConfig fields, backbone-config fields); unknown names raise."""
        backbone_class = CONFIG_MAPPING[backbone_model_type]
        own_fields = set(cls.__dataclass_fields__) | {"num_labels"}
        backbone_fields = set(backbone_class.__dataclass_fields__) - set(
            PreTrainedConfig.__dataclass_fields__
        )
        if (
            backbone_model_type in PLAIN_VIT_TYPES + HIERARCHICAL_TYPES
        ):  # AutoBackbone levels (not dataclass fields)
            backbone_fields |= {"out_indices", "out_features"}
        top_level, backbone = {}, {}
        for key, value in overrides.items():
            if key in own_fields:
                top_level[key] = value
            elif key in backbone_fields:
                backbone[key] = value
            else:
                raise ValueError(
                    f"CPSLConfig: unknown override {key!r}; it is neither a CPSLConfig field nor a field of "
                    f"{backbone_class.__name__}."
                )
        return top_level, backbone


CPSLConfig.register_for_auto_class("AutoConfig")


def _stage_channels(backbone: PreTrainedConfig) -> list[int]:
    """Channels of each entry of a hierarchical ``AutoBackbone``'s ``stage_names`` (stem first)."""
    if backbone.model_type in ("swin", "swinv2"):  # the width doubles at each patch merging
        return [backbone.embed_dim] + [backbone.embed_dim * 2**stage for stage in range(len(backbone.depths))]
    return [backbone.hidden_sizes[0], *backbone.hidden_sizes]


_PRESET_DEFINING_FIELDS = (
    "model_type",
    "hidden_sizes",
    "depths",
    "layer_type",
    "hidden_size",
    "num_hidden_layers",
    "patch_size",
    "embed_dim",
    "intermediate_size",
    "mlp_ratio",
)
"""The backbone-config fields that tell the presets apart (the encoder's size and family); a preset is compared
on those it sets."""

_FAMILY_NAMES = {
    "segformer": "SegFormer (MiT encoder)",
    "resnet": "DeepLab-V2 (ResNet encoder)",
    "dinov2": "DINOv2 ViT (simple feature pyramid)",
    "dinov2_with_registers": "DINOv2 ViT with registers (simple feature pyramid)",
    "dinov3_vit": "DINOv3 ViT (simple feature pyramid)",
    "convnext": "ConvNeXt",
    "convnextv2": "ConvNeXt V2",
    "dinov3_convnext": "DINOv3 ConvNeXt",
    "swin": "Swin Transformer",
    "swinv2": "Swin Transformer V2",
}


def matching_preset(config: CPSLConfig) -> str | None:
    """The name of the :data:`PRESETS` entry whose encoder ``config.backbone_config`` has (same family, widths,
    depths), e.g. ``segformer-b5`` for a model built from ``nvidia/mit-b5``; ``None`` when none matches."""
    backbone = config.backbone_config.to_dict()
    for name, preset in PRESETS.items():
        wanted = preset["backbone_config"]
        keys = [
            key for key in _PRESET_DEFINING_FIELDS if key in wanted or key in ("model_type", "layer_type")
        ]
        if all(wanted.get(key) == backbone.get(key) for key in keys):
            return name
    return None


def describe_architecture(config: CPSLConfig) -> str:
    """The architecture in words for a model card, never a path: family, preset size (when one matches),
    decode head and pixel-embedding size D, e.g. ``SegFormer (MiT encoder) segformer-b5, segformer decode head,
    D=768``."""
    preset = matching_preset(config)
    family = _FAMILY_NAMES.get(config.backbone_type, config.backbone_type)
    size = preset if preset is not None else "custom size"
    return f"{family} {size}, {config.decode_head} decode head, D={config.embedding_dim}"


__all__ = [
    "CITYSCAPES_CLASSES",
    "HIERARCHICAL_TYPES",
    "PLAIN_VIT_TYPES",
    "PRESETS",
    "PYRAMID_STRIDES",
    "CPSLConfig",
    "default_class_names",
    "default_out_indices",
    "describe_architecture",
    "matching_preset",
]
