"""CPSL segmentation model: a transformers backbone + decode head + self-labeling (cosine prototype) head.

Backbones come from ``transformers``: ``SegformerModel`` (MiT-B0..B5) with the SegFormer all-MLP decode head,
``ResNetModel`` dilated in place to output stride 8 with a DeepLab-V2 ASPP head (plain or the ProDA/CPSL variant),
or any ``AutoBackbone`` family of ``configuration_cpsl.PLAIN_VIT_TYPES`` / ``HIERARCHICAL_TYPES`` (DINOv2, DINOv3,
ConvNeXt, Swin) with the SegFormer head; plain ViTs go through ViTDet's simple feature pyramid first.
This file travels with every saved checkpoint as remote code, so it imports only ``torch``, ``transformers`` and
``configuration_cpsl`` (relatively).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoBackbone, AutoConfig, PreTrainedModel, ResNetModel, SegformerModel
from transformers import initialization as init
from transformers.models.resnet.modeling_resnet import ResNetShortCut
from transformers.models.upernet.modeling_upernet import UperNetHead
from transformers.utils import ModelOutput

from .configuration_cpsl import DECODE_HEADS, PRESETS, PYRAMID_STRIDES, CPSLConfig, default_out_indices

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_cpsl.CPSLConfig",
    "AutoModel": "modeling_cpsl.CPSLForSemanticSegmentation",
    "AutoModelForSemanticSegmentation": "modeling_cpsl.CPSLForSemanticSegmentation",
}
"""The ``auto_map`` written into every saved ``config.json`` (remote-code entry points)."""


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """N x C x h x w maps resized to N x C x H x W, bilinear with ``align_corners=False`` (``F.interpolate``'s
    values, to float rounding), in the maps' dtype and memory format; the maps themselves when they already have
    that size (the identity, exactly).

    On the CPU it is two matrix products with the separable interpolation weights (each output row and column
    mixes two input ones), ``A_h @ maps @ A_w^T``: there ``F.interpolate``'s backward is a scalar loop that needs
    a contiguous gradient, and it took a quarter of a SegFormer training step (the decode head's four
    upsamplings and the loss's); the products and their gradients run on the BLAS. Channels-last maps (the
    SegFormer head's, see :func:`pixel_affine`) are resized as N x h x w x C rows without a layout copy and come
    back channels-last. Elsewhere (CUDA) it is ``F.interpolate``.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.device.type != "cpu" or not maps.is_floating_point():
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    rows = _interpolation_weights(maps.shape[-2], size[0]).to(maps.dtype)
    columns = _interpolation_weights(maps.shape[-1], size[1]).to(maps.dtype)
    with torch.autocast(device_type="cpu", enabled=False):  # in the maps' dtype, as F.interpolate
        if maps.ndim == 4 and _is_channels_last(maps):
            batch, channels, height, width = maps.shape
            pixels = maps.permute(0, 2, 3, 1)  # N x h x w x C, contiguous
            resized_rows = torch.matmul(
                rows, pixels.reshape(batch, height, width * channels)
            )  # N x H x (w C)
            resized = torch.matmul(
                columns, resized_rows.reshape(batch * size[0], width, channels)
            )  # NH x W x C
            return resized.reshape(batch, size[0], size[1], channels).permute(0, 3, 1, 2)
        return torch.matmul(torch.matmul(rows, maps), columns.T)


def _is_channels_last(maps: torch.Tensor) -> bool:
    """True when N x C x h x w ``maps`` are laid out as contiguous N x h x w x C rows and not also NCHW-contiguous
    (a single channel or a single pixel is both, and takes the plain path)."""
    return maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous()


def pixel_affine(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The per-pixel affine map ``weight @ z + bias`` of N x C_in x h x w ``maps``: N x C_out x h x w.

    On the CPU it is one matrix product over the N x h x w x C_in pixel rows, and the result is channels-last
    (contiguous N x h x w x C_out rows, which :func:`resize_bilinear` and the next per-pixel map read without a
    layout copy; oneDNN's 1x1 convolution backward took eight times longer at the CPSL step's batch of 16).
    Elsewhere it is a 1x1 convolution.

    Args:
        maps: N x C_in x h x w. weight: C_out x C_in. bias: C_out or None.
    """
    if maps.device.type != "cpu":
        return F.conv2d(maps, weight[:, :, None, None], bias)
    return F.linear(maps.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def pointwise_conv(conv: nn.Conv2d, maps: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` (stride 1, no padding, groups 1) of N x C_in x h x w ``maps`` as :func:`pixel_affine`:
    N x C_out x h x w."""
    return pixel_affine(maps, conv.weight.flatten(1), conv.bias)


_INTERPOLATION_WEIGHTS: dict[tuple[int, int], torch.Tensor] = {}


def _interpolation_weights(input_size: int, output_size: int) -> torch.Tensor:
    """output_size x input_size float64 weights of 1-D linear interpolation with ``align_corners=False``, as
    PyTorch computes them: source coordinate ``(i + 0.5) * input_size / output_size - 0.5`` clamped at 0, its
    floor and the next index (the last one repeated at the border), weighted by the distance (rows sum to 1)."""
    key = (input_size, output_size)
    if key not in _INTERPOLATION_WEIGHTS:
        with torch.inference_mode(False):  # cached for training too: never an inference tensor
            _INTERPOLATION_WEIGHTS[key] = _linear_interpolation_weights(input_size, output_size)
    return _INTERPOLATION_WEIGHTS[key]


def _linear_interpolation_weights(input_size: int, output_size: int) -> torch.Tensor:
    """The weights of :func:`_interpolation_weights`, computed (uncached)."""
    source = (torch.arange(output_size, dtype=torch.float64) + 0.5) * (input_size / output_size) - 0.5
    source = source.clamp(min=0)
    lower = source.floor().long().clamp(max=input_size - 1)
    upper = (lower + 1).clamp(max=input_size - 1)
    upper_weight = source - lower
    weights = torch.zeros(output_size, input_size, dtype=torch.float64)
    rows = torch.arange(output_size)
    weights.index_put_((rows, lower), 1 - upper_weight, accumulate=True)
    weights.index_put_((rows, upper), upper_weight, accumulate=True)
    return weights


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CPSLSemanticSegmenterOutput(ModelOutput):
    """Output of :class:`CPSLForSemanticSegmentation`.

    Args:
        loss: 0-dim cross-entropy at label resolution (only when ``labels`` are given).
        logits: N x C x h x w segmentation scores at the decode resolution (h = H / ``config.output_stride``).
        embeddings: N x D x h x w pixel embeddings of the decode head, before the classifier
            (only with ``output_embeddings=True``).
        sl_logits: N x C x h x w self-labeling scores ``cos(z, W) / tau`` (only with ``output_embeddings=True``).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    sl_logits: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------- heads
class MaskDropout(nn.Dropout):
    """``nn.Dropout`` whose mask, on the CPU, is ``uniform >= p`` (the same Bernoulli(1 - p) keep mask and
    1 / (1 - p) scaling): the CPU's ``bernoulli_`` draws each element serially at about twice the cost of
    ``rand_like`` and was a tenth of a SegFormer-tiny training step. Elsewhere, and in eval mode, ``nn.Dropout``.

    Input and output: any shape.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or features.device.type != "cpu" or self.p >= 1:
            return super().forward(features)
        keep = torch.rand_like(features) >= self.p
        return features * keep * (1.0 / (1.0 - self.p))


class CPSLSegformerDecodeHead(nn.Module):
    """SegFormer all-MLP decode head (same layers and weight names as ``SegformerDecodeHead``) that also returns
    the fused pixel embedding before dropout and classifier: the BatchNorm output before the ReLU (signed,
    ``config.segformer_embedding="pre_activation"``) or the ReLU output the classifier reads
    (``"post_activation"``).

    Input: the 4 encoder feature maps, N x C_i x H/s_i x W/s_i (s_i = 4, 8, 16, 32; C_i =
    ``config.backbone_level_channels``).
    Output: ``(embeddings N x D x H/4 x W/4, logits N x C x H/4 x W/4)``, D = ``config.embedding_dim`` (a
    SegFormer backbone's ``decoder_hidden_size``).

    The function is SegFormer's, ``fuse(cat_i(upsample(proj_i(x_i))))``, computed in an equivalent order: the
    1x1 fuse is a sum of one D x D block per level and bilinear upsampling commutes with per-pixel affine maps
    (its weights sum to 1), so each level's projection and its fuse block are applied as one affine map
    ``(F_i P_i) x_i + F_i b_i`` at the level's own resolution and the D-channel results are upsampled and summed.
    The 4D -> D fuse at H/4 x W/4, three quarters of a SegFormer training step's FLOPs, and the 4D-channel
    concatenation are gone; the values are the same to float rounding and the gradients reach the same weights.
    """

    def __init__(self, config: CPSLConfig):
        super().__init__()
        level_channels = config.backbone_level_channels
        decoder_size = config.embedding_dim
        self.linear_projections = nn.ModuleList(
            [SegformerProjection(channels, decoder_size) for channels in level_channels]
        )
        self.linear_fuse = nn.Conv2d(decoder_size * len(level_channels), decoder_size, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(decoder_size)
        self.activation = nn.ReLU()
        self.dropout = MaskDropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(decoder_size, config.num_labels, kernel_size=1)
        self.embedding_before_activation = config.segformer_embedding == "pre_activation"

    def forward(self, encoder_hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        target_size = encoder_hidden_states[0].shape[2:]
        decoder_size = self.linear_fuse.out_channels
        # SegFormer concatenates the deepest level first: the fuse's column blocks are levels 3, 2, 1, 0.
        fuse_blocks = self.linear_fuse.weight.flatten(1).split(decoder_size, dim=1)[::-1]
        fused = None
        for features, projection, fuse_block in zip(
            encoder_hidden_states, self.linear_projections, fuse_blocks
        ):
            level = pixel_affine(
                features, fuse_block @ projection.proj.weight, fuse_block @ projection.proj.bias
            )
            level = resize_bilinear(level, target_size)
            fused = level if fused is None else fused + level
        # Channels-last from here on the CPU (see pixel_affine): batch norm and the classifier read pixel rows;
        # the few-channel logits go back to N x C x h x w rows, which the loss's upsampling reads fastest.
        normalized = self.batch_norm(fused)
        activated = self.activation(normalized)
        logits = pointwise_conv(self.classifier, self.dropout(activated)).contiguous()
        return (normalized if self.embedding_before_activation else activated), logits


class SegformerProjection(nn.Module):
    """Per-pixel linear projection C_in -> C_out of one encoder level (weight name ``proj`` as in
    ``SegformerMLP``); :class:`CPSLSegformerDecodeHead` applies it folded into its fuse block."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, output_dim)


class CPSLUperNetHead(UperNetHead):
    """transformers' ``UperNetHead`` (Xiao et al. 2018: pyramid pooling on the deepest level, FPN laterals, 3x3
    convs, a 3x3 fuse of the four levels; the same layers and weight names) that also returns the pixel embedding:
    the fuse's BatchNorm output before its ReLU (signed). Dropout (``classifier_dropout_prob``, as mmsegmentation's
    UperNet) precedes the 1x1 classifier, which reads the ReLU output as in transformers.

    Input: the 4 levels N x C_i x H/s_i x W/s_i (s_i = 4, 8, 16, 32).
    Output: ``(embeddings N x D x H/4 x W/4, logits N x C x H/4 x W/4)``, D = ``embedding_dim``.
    """

    def __init__(self, config: CPSLConfig):
        head_config = SimpleNamespace(
            pool_scales=tuple(config.upernet_pool_scales),
            hidden_size=config.embedding_dim,
            num_labels=config.num_labels,
        )
        super().__init__(head_config, config.backbone_level_channels)
        self.dropout = MaskDropout(config.classifier_dropout_prob)

    def forward(self, encoder_hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # UperNetHead.forward up to its fuse, which it runs whole (conv, BatchNorm, ReLU) into the classifier.
        laterals = [lateral(encoder_hidden_states[i]) for i, lateral in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(encoder_hidden_states))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[2:])
        outputs = [fpn_conv(lateral) for fpn_conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outputs = [outputs[0]] + [resize_bilinear(level, outputs[0].shape[2:]) for level in outputs[1:]]
        fuse = self.fpn_bottleneck
        embeddings = fuse.batch_norm(fuse.conv(torch.cat(outputs, dim=1)))
        logits = self.classifier(self.dropout(fuse.activation(embeddings)))
        return embeddings, logits


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of N x C x h x w maps (ViTDet's ``LayerNorm2d``). Input and output: N x C x h x w."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return super().forward(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, "Exploring plain vision transformer backbones"): four maps
    at strides 4, 8, 16 and 32 from the stride-p token maps of a plain ViT.

    Level 0 upsamples x4 (2x2 deconvolution to D/2, channel LayerNorm, GELU, 2x2 deconvolution to D/4), level 1 x2
    (a 2x2 deconvolution to D/2), level 2 keeps the map and level 3 max-pools 2x2 (ceil mode); each is then
    cropped to the image (the input was padded to a multiple of p), resized to ceil(H / s) x ceil(W / s) when
    p / scale is not s (p = 14), and goes through a 1x1 conv and a 3x3 conv to ``pyramid_channels``, each followed
    by a channel LayerNorm (no biases). With one ViT layer every level reads it (ViTDet); with four, level i reads
    the i-th (as the BEiT / DINOv2 segmentation heads).

    Input: 1 or 4 maps N x D x ceil(H/p) x ceil(W/p) and the image size (H, W).
    Output: 4 maps N x ``pyramid_channels`` x ceil(H/s) x ceil(W/s), s = 4, 8, 16, 32.
    """

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, hidden_size: int, channels: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        half, quarter = hidden_size // 2, hidden_size // 4
        self.rescales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(hidden_size, half, 2, stride=2),
                    ChannelLayerNorm(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(hidden_size, half, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        )
        self.outputs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(width, channels, 1, bias=False),
                    ChannelLayerNorm(channels),
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    ChannelLayerNorm(channels),
                )
                for width in (quarter, half, hidden_size, hidden_size)
            ]
        )

    def forward(
        self, token_maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        height, width = image_size
        levels = []
        for index, (scale, stride) in enumerate(zip(self.SCALES, PYRAMID_STRIDES)):
            token_map = token_maps[index if len(token_maps) == len(self.SCALES) else 0]
            rescaled = self.rescales[index](token_map)
            covered = (
                math.ceil(height * scale / self.patch_size),
                math.ceil(width * scale / self.patch_size),
            )
            rescaled = rescaled[:, :, : covered[0], : covered[1]]
            rescaled = resize_bilinear(rescaled, (math.ceil(height / stride), math.ceil(width / stride)))
            levels.append(self.outputs[index](rescaled))
        return levels


class DeepLabV2ASPPHead(nn.Module):
    """DeepLab-V2 ASPP classifier: parallel 3x3 convs with dilations 6/12/18/24, summed into logits.

    The head is linear in its input, so the pixel embedding it exposes is its input feature map.
    Input: N x D x h x w backbone features (D = ``hidden_sizes[-1]``, 2048 for ResNet-101).
    Output: ``(embeddings N x D x h x w, logits N x C x h x w)``.
    """

    def __init__(self, in_channels: int, num_labels: int, dilations: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [
                nn.Conv2d(in_channels, num_labels, 3, padding=rate, dilation=rate, bias=True)
                for rate in dilations
            ]
        )
        for branch in self.branches:
            branch.cpsl_init = 0.01

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.stack([branch(features) for branch in self.branches]).sum(dim=0)
        return features, logits


class SqueezeExcitation(nn.Module):
    """Channel gating x * sigmoid(MLP(avgpool(x))), reduction 16 (as in ProDA's ASPP)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))  # N x C
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
        return features * gate[:, :, None, None]


class ProDAASPPHead(nn.Module):
    """The ProDA/CPSL variant of the DeepLab-V2 ASPP head, with a D-dim embedding before the classifier.

    Branches: one 1x1 conv and one 3x3 conv per dilation, each to D channels + GroupNorm(32) + ReLU; their
    concatenation goes through squeeze-excitation, a 3x3 conv to D channels and GroupNorm, giving the embedding;
    dropout and a bias-free 1x1 conv give the logits.
    Input: N x C_in x h x w backbone features. Output: ``(embeddings N x D x h x w, logits N x C x h x w)``.
    """

    def __init__(
        self, in_channels: int, embedding_dim: int, num_labels: int, dilations: list[int], dropout: float
    ):
        super().__init__()

        def branch(kernel_size: int, rate: int) -> nn.Sequential:
            padding = rate if kernel_size == 3 else 0
            return nn.Sequential(
                nn.Conv2d(in_channels, embedding_dim, kernel_size, padding=padding, dilation=rate, bias=True),
                nn.GroupNorm(32, embedding_dim),
                nn.ReLU(),
            )

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, rate) for rate in dilations])
        concat_dim = embedding_dim * len(self.branches)
        self.squeeze_excitation = SqueezeExcitation(concat_dim)
        self.fuse = nn.Conv2d(concat_dim, embedding_dim, 3, padding=1, bias=True)
        self.fuse_norm = nn.GroupNorm(32, embedding_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embedding_dim, num_labels, 1, bias=False)
        for conv in [branch[0] for branch in self.branches] + [self.fuse]:
            conv.cpsl_init = "kaiming_fan_in"
        self.squeeze_excitation.fc1.cpsl_init = self.squeeze_excitation.fc2.cpsl_init = "kaiming_fan_out"
        self.classifier.cpsl_init = 0.001

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        concatenated = torch.cat([branch(features) for branch in self.branches], dim=1)
        embeddings = self.fuse_norm(self.fuse(self.squeeze_excitation(concatenated)))
        logits = self.classifier(self.dropout(embeddings))
        return embeddings, logits


class CPSLSelfLabelingHead(nn.Module):
    """Cosine classifier f_SL: ``sl_logits = normalize(z) . normalize(W)^T / tau``.

    Attributes:
        prototypes: nn.Parameter C x D, the class prototypes W.
        temperature: float tau (0.08 by default).
    Input: embeddings N x D x h x w. Output: N x C x h x w.
    """

    def __init__(self, num_labels: int, embedding_dim: int, temperature: float):
        super().__init__()
        self.prototypes = nn.Parameter(torch.empty(num_labels, embedding_dim))
        self.temperature = float(temperature)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[1] != self.prototypes.shape[1]:
            raise ValueError(
                f"CPSLSelfLabelingHead: embeddings have {embeddings.shape[1]} channels, prototypes expect "
                f"{self.prototypes.shape[1]} (embedding_dim)."
            )
        directions = F.normalize(embeddings, dim=1)
        prototypes = F.normalize(self.prototypes, dim=1).to(directions.dtype)
        # N x C x h x w rows whatever the embeddings' layout (a softmax over channels-last maps is slow on the CPU)
        return (torch.einsum("ndhw,cd->nchw", directions, prototypes) / self.temperature).contiguous()

    def extra_repr(self) -> str:
        return f"num_labels={self.prototypes.shape[0]}, embedding_dim={self.prototypes.shape[1]}, tau={self.temperature}"


# ---------------------------------------------------------------------------------------------- backbone
def dilate_resnet_(resnet: ResNetModel, stage_dilations: list[int]) -> ResNetModel:
    """Turn strided ResNet stages into dilated ones, in place (DeepLab-V2, all blocks of a stage share a rate).

    For each stage with dilation d > 1, every conv of the stage gets stride 1 (including the 1x1 shortcut) and
    every 3x3 conv gets dilation = padding = d. Parameter names and shapes do not change, so ImageNet weights of
    ``ResNetModel`` (``microsoft/resnet-101``) load as they are. Returns ``resnet``.
    """
    for stage, dilation in zip(resnet.encoder.stages, stage_dilations):
        if dilation == 1:
            continue
        for module in stage.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation = (dilation, dilation)
                    module.padding = (dilation, dilation)
            elif isinstance(module, ResNetShortCut):
                module.convolution.stride = (1, 1)
    return resnet


def build_backbone(config: CPSLConfig) -> nn.Module:
    """The encoder of ``config`` (random weights): a ``SegformerModel``, a dilated ``ResNetModel`` or the
    ``AutoBackbone`` of the config's family (``Dinov2Backbone``, ``SwinBackbone`` ...)."""
    if config.backbone_type == "segformer":
        return SegformerModel(config.backbone_config)
    if config.backbone_type == "resnet":
        return dilate_resnet_(ResNetModel(config.backbone_config), config.resnet_stage_dilations)
    return AutoBackbone.from_config(config.backbone_config)


_VIT_BLOCK = re.compile(r"^(?:encoder|model)\.layer\.(\d+)\.")
"""A transformer block's parameters in DINOv2 (``encoder.layer.i.``) and DINOv3 (``model.layer.i.``) backbones."""


def vit_block_index(name: str) -> int | None:
    """The 0-based block of a plain-ViT backbone parameter name (``encoder.layer.3.mlp...`` -> 3); None outside
    the blocks (embeddings, final norm)."""
    block = _VIT_BLOCK.match(name)
    return int(block.group(1)) if block else None


def unused_by_segmentation(name: str, config: CPSLConfig) -> bool:
    """True for a backbone parameter that segmentation never uses, frozen at construction (no gradient could
    reach it, and DDP requires one for every trainable parameter): the mask token of DINOv2 / DINOv3 (masked-image
    pretraining only), Swin's final LayerNorm (the backbone normalises each stage with its own), and the ViT blocks
    after the deepest layer in ``out_indices`` (they run, their output is not read)."""
    if not config.is_autobackbone:
        return False
    if name.startswith("embeddings.") and name.endswith("mask_token"):
        return True
    if config.backbone_type == "swin":
        return name.startswith(("swin.layernorm.", "layernorm."))
    if config.is_plain_vit:
        block = vit_block_index(name)
        return block is not None and block >= max(config.backbone_config.out_indices)
    return False


def backbone_input_multiple(config: CPSLConfig) -> int:
    """The side an ``AutoBackbone``'s input is padded to a multiple of: the patch size p of a plain ViT, 32 (the
    deepest stride) for a hierarchical backbone."""
    return config.backbone_config.patch_size if config.is_plain_vit else PYRAMID_STRIDES[-1]


def build_image_processor():
    """The image processor saved with every checkpoint: a ``SegformerImageProcessor`` (its PIL backend when
    torchvision is not installed; saved as ``SegformerImageProcessor`` either way) with rescale 1/255 and ImageNet
    mean/std, and ``do_resize=False``: the network is fully convolutional and is trained and evaluated at the
    images' own scale, and ``pipeline("image-segmentation")`` upsamples the logits back to each input's size."""
    import importlib.util

    from transformers import SegformerImageProcessor, SegformerImageProcessorPil

    has_torchvision = importlib.util.find_spec("torchvision") is not None
    processor_class = SegformerImageProcessor if has_torchvision else SegformerImageProcessorPil
    return processor_class(
        do_resize=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_reduce_labels=False,
    )


# ---------------------------------------------------------------------------------------------- model
class CPSLPreTrainedModel(PreTrainedModel):
    config_class = CPSLConfig
    config: CPSLConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the head modules (the backbone sub-model initialises itself).

        Generic layers: normal(0, initializer_range) for conv/linear weights, zero biases, unit norms. Then the
        head-specific schemes of the references, marked on the layers as ``cpsl_init`` (a std or a kaiming mode):
        DeepLab-V2 ASPP normal(0, 0.01); ProDA kaiming (fan_in) for the branch and fuse convs, kaiming (fan_out)
        for the SE MLP, normal(0, 0.001) for the classifier; the self-labeling prototypes W
        normal(0, initializer_range) (only their directions matter).
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            scheme = getattr(module, "cpsl_init", std)
            if scheme in ("kaiming_fan_in", "kaiming_fan_out"):
                init.kaiming_normal_(module.weight, a=0, mode=scheme.removeprefix("kaiming_"))
            else:
                init.normal_(module.weight, mean=0.0, std=scheme)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, CPSLSelfLabelingHead):
            init.normal_(module.prototypes, mean=0.0, std=std)


class CPSLForSemanticSegmentation(CPSLPreTrainedModel):
    """Backbone + decode head + self-labeling head (SPEC.md: f_SEG and f_SL).

    Attributes:
        backbone: ``SegformerModel``, dilated ``ResNetModel`` or an ``AutoBackbone`` (weight names as in
            transformers).
        neck: ``SimpleFeaturePyramid`` for plain ViTs, else ``None``.
        decode_head: ``CPSLSegformerDecodeHead``, ``CPSLUperNetHead``, ``ProDAASPPHead`` or ``DeepLabV2ASPPHead``.
        self_labeling_head: ``CPSLSelfLabelingHead`` with ``.prototypes`` (C x D) and ``.temperature``.
    """

    def __init__(self, config: CPSLConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        for name, parameter in self.backbone.named_parameters():
            if unused_by_segmentation(name, config):
                parameter.requires_grad_(False)
        self.neck = (
            SimpleFeaturePyramid(
                config.backbone_config.hidden_size, config.pyramid_channels, config.backbone_config.patch_size
            )
            if config.is_plain_vit
            else None
        )
        if config.decode_head == "segformer":
            self.decode_head = CPSLSegformerDecodeHead(config)
        elif config.decode_head == "upernet":
            self.decode_head = CPSLUperNetHead(config)
        elif config.decode_head == "proda":
            self.decode_head = ProDAASPPHead(
                config.backbone_config.hidden_sizes[-1],
                config.embedding_dim,
                config.num_labels,
                config.aspp_dilations,
                config.classifier_dropout_prob,
            )
        else:
            self.decode_head = DeepLabV2ASPPHead(
                config.backbone_config.hidden_sizes[-1], config.num_labels, config.aspp_dilations
            )
        self.self_labeling_head = CPSLSelfLabelingHead(
            config.num_labels, config.embedding_dim, config.sl_temperature
        )
        self.post_init()

    # ------------------------------------------------------------------ forward
    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone + decode head.

        Args:
            pixel_values: N x 3 x H x W ImageNet-normalised float images.
        Returns:
            ``(embeddings N x D x h x w, logits N x C x h x w)`` with h = ceil-ish(H / output_stride).
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"CPSLForSemanticSegmentation: pixel_values must be N x 3 x H x W, got {tuple(pixel_values.shape)}."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                "CPSLForSemanticSegmentation: pixel_values must be ImageNet-normalised floats, got "
                f"{pixel_values.dtype} (convert uint8 images with cpsl_hf.data.transforms.to_float + normalize)."
            )
        if self.config.backbone_type == "segformer":
            features = self.backbone(pixel_values, output_hidden_states=True).hidden_states
        elif self.config.backbone_type == "resnet":
            features = self.backbone(pixel_values).last_hidden_state
        else:
            features = self.autobackbone_levels(pixel_values)
        return self.decode_head(features)

    def autobackbone_levels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The four maps an ``AutoBackbone`` hands the decode head.

        The images are zero-padded on the bottom and right to a multiple of :func:`backbone_input_multiple` (p or
        32; zero is the mean colour after normalisation); a plain ViT's token maps go through the simple feature
        pyramid, a hierarchical backbone's stages are cropped back to the image.

        Args:
            pixel_values: N x 3 x H x W.
        Returns:
            4 maps N x C_i x ceil(H/s) x ceil(W/s), s = 4, 8, 16, 32 (C_i: ``config.backbone_level_channels``).
        """
        height, width = pixel_values.shape[-2:]
        multiple = backbone_input_multiple(self.config)
        padded = F.pad(pixel_values, (0, -width % multiple, 0, -height % multiple))
        feature_maps = self.backbone(padded).feature_maps
        if self.neck is not None:
            return self.neck(feature_maps, (height, width))
        return [
            features[:, :, : math.ceil(height / stride), : math.ceil(width / stride)]
            for features, stride in zip(feature_maps, PYRAMID_STRIDES)
        ]

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_embeddings: bool = False,
        return_dict: bool | None = None,
    ) -> CPSLSemanticSegmenterOutput | tuple:
        """Segment a batch.

        Args:
            pixel_values: N x 3 x H x W ImageNet-normalised float images.
            labels: optional int64 N x H' x W' train ids (``config.ignore_index`` ignored); the loss is the
                cross-entropy of the logits upsampled bilinearly to H' x W'.
            output_embeddings: also return ``embeddings`` (N x D x h x w) and ``sl_logits`` (N x C x h x w).
            return_dict: return a :class:`CPSLSemanticSegmenterOutput` (default) or a tuple of its non-None fields.
        """
        embeddings, logits = self.encode(pixel_values)
        loss = self.segmentation_loss(logits, labels) if labels is not None else None
        sl_logits = self.self_labeling_head(embeddings) if output_embeddings else None
        output = CPSLSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            embeddings=embeddings if output_embeddings else None,
            sl_logits=sl_logits,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at label resolution, computed in (at least) float32 outside autocast.

        The same loss as :func:`cpsl_hf.selflabel.masked_cross_entropy`, which the trainer uses (this file
        travels as remote code, so it cannot import it): the mean over labelled pixels, and 0 with a zero
        gradient when no pixel is labelled (a crop of nothing but ignored pixels), where ``F.cross_entropy``'s
        mean would be NaN.

        Args:
            logits: N x C x h x w. labels: int64 N x H x W (``config.ignore_index`` ignored).
        Returns:
            0-dim mean over non-ignored pixels (0 when there is none).
        """
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"CPSLForSemanticSegmentation: labels must be N x H x W with N={logits.shape[0]}, "
                f"got {tuple(labels.shape)}."
            )
        upsampled = resize_bilinear(logits, labels.shape[-2:])
        labels = labels.long()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            upsampled = upsampled.to(torch.promote_types(upsampled.dtype, torch.float32))
            per_pixel = F.cross_entropy(
                upsampled, labels, ignore_index=self.config.ignore_index, reduction="none"
            )  # 0 at ignored pixels
            labelled = (labels != self.config.ignore_index).sum()
            return per_pixel.sum() / labelled.clamp_min(1).to(per_pixel.dtype)

    # ------------------------------------------------------------------ training helpers
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role, each exactly once: ``"backbone"`` (encoder), ``"head"`` (the ViT feature
        pyramid, if any, and the decode head incl. classifier) and ``"prototypes"`` (W). Parameters with ``requires_grad=False`` are left out."""
        neck = [] if self.neck is None else list(self.neck.parameters())
        groups = {
            "backbone": list(self.backbone.parameters()),
            "head": neck + list(self.decode_head.parameters()),
            "prototypes": [self.self_labeling_head.prototypes],
        }
        return {name: [p for p in params if p.requires_grad] for name, params in groups.items()}

    # ------------------------------------------------------------------ building / saving
    @classmethod
    def from_pretrained_backbone(
        cls,
        name_or_path: str,
        num_labels: int = 19,
        id2label: dict[int, str] | None = None,
        strict: bool = False,
        **config_overrides,
    ) -> CPSLForSemanticSegmentation:
        """Build a model whose encoder is loaded from a pretrained checkpoint (Hub id or folder): a
        ``SegformerModel``/MiT (``nvidia/mit-b5``), a ``ResNetModel`` (``microsoft/resnet-101``) or a model of an
        ``AutoBackbone`` family (``facebook/dinov2-large``, ``facebook/dinov3-vitl16-pretrain-lvd1689m``,
        ``facebook/convnext-base-224``, ``microsoft/swin-tiny-patch4-window7-224`` ...). Heads of
        classification/segmentation checkpoints are reported as unexpected and skipped. Decode head, ViT feature
        pyramid and prototypes are freshly initialised.

        For a MiT encoder whose (depths, hidden_sizes) match a SegFormer preset, the decode-head width defaults to
        that preset's (256 for B0/B1, 768 for B2-B5); pass ``decoder_hidden_size=...`` to choose. An AutoBackbone
        hands over ``default_out_indices`` (stages 1-4; layers L/4, L/2, 3L/4, L of a ViT) unless
        ``out_indices=...`` or ``out_features=...`` is given.

        Args:
            name_or_path: Hub id or local folder of the encoder checkpoint.
            num_labels, id2label: classes (Cityscapes names by default for 19/16/13).
            strict: raise if any encoder weight is missing from the checkpoint (default: warn).
            config_overrides: ``CPSLConfig`` or backbone-config fields, as in ``CPSLConfig.from_preset``.
        Returns:
            the model; ``model.backbone_loading_info`` holds ``missing_keys``, ``unexpected_keys`` and
            ``mismatched_keys`` of the encoder load, and ``new_layers``: the per-stage output LayerNorms that
            ConvNeXt / Swin backbones add (``hidden_states_norms.*``, not part of an encoder checkpoint; initialised
            to the identity and trained with the encoder).
        """
        encoder_config = AutoConfig.from_pretrained(name_or_path)
        model_type = encoder_config.model_type
        if model_type not in DECODE_HEADS:
            raise ValueError(
                f"from_pretrained_backbone: {name_or_path!r} has model_type={model_type!r}; expected one of "
                f"{sorted(DECODE_HEADS)} (SegFormer/MiT, ResNet or an AutoBackbone family)."
            )
        backbone_dict = {
            key: value
            for key, value in encoder_config.to_dict().items()
            if key not in ("id2label", "label2id", "architectures", "transformers_version", "_name_or_path")
        }
        top_level, backbone_overrides = CPSLConfig.route_overrides(model_type, config_overrides)
        if model_type == "segformer" and "decoder_hidden_size" not in backbone_overrides:
            for preset in PRESETS.values():
                preset_backbone = preset["backbone_config"]
                if preset_backbone["model_type"] == "segformer" and (
                    list(preset_backbone["depths"]) == list(encoder_config.depths)
                    and list(preset_backbone["hidden_sizes"]) == list(encoder_config.hidden_sizes)
                ):
                    backbone_overrides["decoder_hidden_size"] = preset_backbone["decoder_hidden_size"]
        if model_type not in ("segformer", "resnet"):
            set_backbone_levels(backbone_dict, backbone_overrides)
        backbone_dict.update(backbone_overrides)
        if id2label is not None:
            top_level["id2label"] = {int(key): value for key, value in id2label.items()}
        config = CPSLConfig(backbone_config=backbone_dict, num_labels=num_labels, **top_level)
        model = cls(config)

        # The AutoBackbone's own class (Dinov2Backbone ...): AutoBackbone.from_pretrained asks the Hub whether the
        # name is a repo before it reads a local folder, and fails offline.
        encoder_class = {"segformer": SegformerModel, "resnet": ResNetModel}.get(
            model_type, type(model.backbone)
        )
        encoder, loading_info = encoder_class.from_pretrained(
            name_or_path, config=config.backbone_config, output_loading_info=True
        )
        model.backbone.load_state_dict(encoder.state_dict(), strict=True)
        missing = sorted(loading_info.get("missing_keys", []))
        new_layers = [key for key in missing if key.startswith(ADDED_BACKBONE_LAYERS)]
        model.backbone_loading_info = {
            "missing_keys": [key for key in missing if key not in new_layers],
            "unexpected_keys": sorted(loading_info.get("unexpected_keys", [])),
            "mismatched_keys": sorted(loading_info.get("mismatched_keys", [])),
            "new_layers": new_layers,
        }
        missing = model.backbone_loading_info["missing_keys"] + model.backbone_loading_info["mismatched_keys"]
        if missing and strict:
            raise ValueError(f"from_pretrained_backbone: {name_or_path!r} lacks encoder weights {missing}.")
        if missing:
            logger.warning(
                "from_pretrained_backbone: encoder weights NOT loaded from %s: %s", name_or_path, missing
            )
        if model.backbone_loading_info["unexpected_keys"]:
            logger.warning(
                "from_pretrained_backbone: checkpoint weights not used by the encoder (%s): %s",
                name_or_path,
                model.backbone_loading_info["unexpected_keys"],
            )
        if new_layers:
            logger.info(
                "from_pretrained_backbone: layers the backbone adds, newly initialised: %s", new_layers
            )
        return model

    def save_pretrained(
        self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs
    ):
        """``PreTrainedModel.save_pretrained`` (safetensors) + the remote-code files (``configuration_cpsl.py``,
        ``modeling_cpsl.py``), a full ``auto_map`` (AutoConfig, AutoModel, AutoModelForSemanticSegmentation) and
        ``preprocessor_config.json``. With ``push_to_hub=True`` the image processor is pushed after the model,
        with the same hub keyword arguments (``repo_id``, ``token``, ``commit_message`` ...)."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(
            save_directory, is_main_process=is_main_process, push_to_hub=push_to_hub, **kwargs
        )
        if is_main_process:
            hub_kwargs = {
                key: value for key, value in kwargs.items() if key not in _MODEL_ONLY_SAVE_ARGUMENTS
            }
            build_image_processor().save_pretrained(save_directory, push_to_hub=push_to_hub, **hub_kwargs)
        return result


ADDED_BACKBONE_LAYERS = ("hidden_states_norms.",)
"""Prefixes of the layers an ``AutoBackbone`` adds to its encoder (per-stage output norms of ConvNeXt / Swin)."""


def set_backbone_levels(backbone_dict: dict, overrides: dict) -> None:
    """Make an AutoBackbone config dict hand over the levels CPSL reads, in place: ``overrides``' ``out_indices``
    or ``out_features`` when given (the other one is dropped, transformers rejects two that disagree), else
    :func:`default_out_indices`."""
    if "out_features" in overrides:
        backbone_dict.pop("out_indices", None)
    else:
        backbone_dict.pop("out_features", None)
        if "out_indices" not in overrides:
            layers = backbone_dict.get("num_hidden_layers", 0)
            backbone_dict["out_indices"] = default_out_indices(backbone_dict["model_type"], layers)


_MODEL_ONLY_SAVE_ARGUMENTS = {
    "state_dict",
    "max_shard_size",
    "variant",
    "save_peft_format",
    "save_original_format",
    "distributed_checkpoint",
}

CPSLForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "AUTO_MAP",
    "CPSLForSemanticSegmentation",
    "CPSLPreTrainedModel",
    "CPSLSelfLabelingHead",
    "CPSLSemanticSegmenterOutput",
    "build_image_processor",
    "dilate_resnet_",
]
