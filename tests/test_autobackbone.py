"""AutoBackbone families (DINOv2, DINOv2 with registers, DINOv3 ViT, ConvNeXt, ConvNeXt V2, DINOv3 ConvNeXt, Swin,
Swin V2): output strides,
the ViT simple feature pyramid, config validation, presets at the published sizes, and encoder loading.

Round trips, the remote-code path and the pipeline of every family are in test_checkpoint.py."""

import math

import pytest
import torch
from backbone_helpers import PLAIN_VITS, TINY_BACKBONES, tiny_backbone_config
from transformers import (
    AutoBackbone,
    AutoConfig,
    ConvNextModel,
    ConvNextV2Model,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ConvNextModel,
    DINOv3ViTModel,
    SwinModel,
    Swinv2Model,
)

from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation
from cpsl_hf.configuration_cpsl import describe_architecture, matching_preset

SIZES = [
    (64, 96),
    (45, 61),
    (37, 53),
]  # a multiple of 32, and two sizes that are multiples of neither 14 nor 16


def _model(family, **overrides):
    torch.manual_seed(0)
    return CPSLForSemanticSegmentation(tiny_backbone_config(family, **overrides)).eval()


def _pad(pixels, multiple):
    """Zero-pad N x 3 x H x W on the bottom and right to multiples of ``multiple`` (written out independently)."""
    height, width = pixels.shape[-2:]
    padded = torch.zeros(
        *pixels.shape[:2], math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
    )
    padded[:, :, :height, :width] = pixels
    return padded


@pytest.mark.parametrize("family", sorted(TINY_BACKBONES))
def test_every_family_gives_logits_and_embeddings_at_stride_4(family):
    model = _model(family)
    assert model.config.output_stride == 4 and model.config.decode_head == "segformer"
    for height, width in SIZES:
        with torch.no_grad():
            output = model(torch.randn(2, 3, height, width), output_embeddings=True)
        grid = (math.ceil(height / 4), math.ceil(width / 4))
        assert output.logits.shape == (2, 19, *grid)
        assert output.embeddings.shape == (2, 32, *grid)
        assert output.sl_logits.shape == (2, 19, *grid)
        assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit"])  # patch 14 and patch 16
@pytest.mark.parametrize("size", [(45, 61), (50, 71), (28, 32)])
def test_vit_pyramid_has_strides_4_8_16_32_and_reads_the_chosen_layers(family, size):
    model = _model(family)
    patch = model.config.backbone_config.patch_size
    pixels = torch.randn(1, 3, *size)
    rescale_inputs = []
    hooks = [
        rescale.register_forward_hook(lambda module, inputs, output: rescale_inputs.append(inputs[0]))
        for rescale in model.neck.rescales
    ]
    with torch.no_grad():
        levels = model.autobackbone_levels(pixels)
        # The backbone on the image padded by hand: one ceil(H/p) x ceil(W/p) map per chosen layer (1, 2, 3, 4).
        token_maps = model.backbone(_pad(pixels, patch)).feature_maps
    for hook in hooks:
        hook.remove()
    assert [tuple(level.shape[-2:]) for level in levels] == [
        (math.ceil(size[0] / stride), math.ceil(size[1] / stride)) for stride in (4, 8, 16, 32)
    ]
    assert all(level.shape[:2] == (1, 16) for level in levels)
    assert token_maps[0].shape[-2:] == (math.ceil(size[0] / patch), math.ceil(size[1] / patch))
    assert len(rescale_inputs) == 4
    for level_input, token_map in zip(rescale_inputs, token_maps):  # level i reads layer i
        assert torch.equal(level_input, token_map)
    assert not torch.equal(token_maps[0], token_maps[3])
    if patch == 16:  # level 2 is the token map itself, cropped to the image: no resampling
        crop = token_maps[2][:, :, : math.ceil(size[0] / 16), : math.ceil(size[1] / 16)]
        with torch.no_grad():
            torch.testing.assert_close(levels[2], model.neck.outputs[2](crop), rtol=0, atol=0)


def test_vitdet_single_layer_feeds_all_four_levels():
    torch.manual_seed(0)
    config = CPSLConfig(
        backbone_config={**TINY_BACKBONES["dinov2"], "out_indices": [4]},
        embedding_dim=32,
        pyramid_channels=16,
    )
    model = CPSLForSemanticSegmentation(config).eval()
    rescale_inputs = []
    for rescale in model.neck.rescales:
        rescale.register_forward_hook(lambda module, inputs, output: rescale_inputs.append(inputs[0]))
    pixels = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        logits = model(pixels).logits
        (last_layer,) = model.backbone(_pad(pixels, 14)).feature_maps
    assert logits.shape == (1, 19, 12, 16)
    assert len(rescale_inputs) == 4 and all(torch.equal(tensor, last_layer) for tensor in rescale_inputs)


@pytest.mark.parametrize("family", ["convnext", "convnextv2", "dinov3_convnext", "swin", "swinv2"])
def test_hierarchical_levels_are_the_four_stages_of_the_padded_image_cropped(family):
    model = _model(family)
    pixels = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        levels = model.autobackbone_levels(pixels)
        stages = model.backbone(_pad(pixels, 32)).feature_maps
    assert model.config.backbone_level_channels == list(model.backbone.num_features[1:])
    for level, stage, stride in zip(levels, stages, (4, 8, 16, 32)):
        assert stage.shape[-2:] == (64 // stride, 64 // stride)
        assert torch.equal(level, stage[:, :, : math.ceil(45 / stride), : math.ceil(61 / stride)])


def test_autobackbone_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"out_indices must be \[1, 2, 3, 4\], got \[4\]"):
        CPSLConfig(backbone_config={**TINY_BACKBONES["convnext"]})  # the transformers default: stage4 only
    with pytest.raises(ValueError, match=r"needs 1 layer .* or 4 layers .* got \[1, 2, 3\]"):
        CPSLConfig(backbone_config={**TINY_BACKBONES["dinov2"], "out_indices": [1, 2, 3]})
    with pytest.raises(ValueError, match="output_stride=8 is not possible for DINOv2"):
        tiny_backbone_config("dinov2", output_stride=8)
    with pytest.raises(ValueError, match="pyramid_channels=16 is only for plain ViT"):
        tiny_backbone_config("swin", pyramid_channels=16)
    with pytest.raises(ValueError, match="pyramid_channels=16 is only for plain ViT"):
        CPSLConfig.from_preset("segformer-tiny", pyramid_channels=16)
    with pytest.raises(ValueError, match="decode_head='proda' does not fit a dinov2"):
        tiny_backbone_config("dinov2", decode_head="proda")
    assert tiny_backbone_config("swin", embedding_dim=40).embedding_dim == 40  # no GroupNorm: any width


@pytest.mark.parametrize("decode_head", ["segformer", "upernet"])
@pytest.mark.parametrize("family", sorted(TINY_BACKBONES))
def test_every_trainable_parameter_gets_a_gradient(family, decode_head):
    """What DDP needs (it fails on a trainable parameter without a gradient): the parameters segmentation never
    uses (mask tokens, Swin's final norm) are frozen, all others get a gradient from the loss and L_SL."""
    model = _model(family, decode_head=decode_head).train()
    output = model(
        torch.randn(2, 3, 45, 61), labels=torch.randint(0, 19, (2, 45, 61)), output_embeddings=True
    )
    (output.loss + output.sl_logits.mean()).backward()
    without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    expected = {
        "swin": ["backbone.swin.layernorm.bias", "backbone.swin.layernorm.weight"],
        "swinv2": [],
        "convnext": [],
        "convnextv2": [],
        "dinov3_convnext": [],
    }.get(family, ["backbone.embeddings.mask_token"])
    assert frozen == expected


def test_vit_blocks_after_the_deepest_chosen_layer_are_frozen():
    torch.manual_seed(0)
    config = CPSLConfig(
        backbone_config={**TINY_BACKBONES["dinov3_vit"], "out_indices": [2]},
        embedding_dim=32,
        pyramid_channels=16,
    )
    model = CPSLForSemanticSegmentation(config).train()
    frozen_blocks = {
        name.split(".")[2]
        for name, p in model.backbone.named_parameters()
        if not p.requires_grad and ".layer." in name
    }
    assert frozen_blocks == {"2", "3"}  # stage2 is block 1's output: blocks 2 and 3 are not read
    model(torch.randn(1, 3, 32, 32), labels=torch.randint(0, 19, (1, 32, 32))).loss.backward()
    assert all(
        p.grad is not None
        for p in model.parameters()
        if p.requires_grad and p is not model.self_labeling_head.prototypes
    )


def test_parameter_groups_put_the_pyramid_with_the_head():
    model = _model("dinov2")
    groups = model.parameter_groups()
    head = {id(p) for p in groups["head"]}
    assert {id(p) for p in model.neck.parameters()} <= head
    assert {id(p) for p in groups["backbone"]} == {
        id(p) for p in model.backbone.parameters() if p.requires_grad
    }
    assert len(head) + len(groups["backbone"]) + 1 == len([p for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------------------------------- presets
# Published parameter counts in millions. ConvNeXt (Liu et al. 2022, facebookresearch/ConvNeXt: 28.59M, 88.59M,
# 197.77M) and Swin (Liu et al. 2021, microsoft/Swin-Transformer: 28.29M, 87.77M) count the ImageNet-1k model:
# the encoder, a final LayerNorm and a 1000-class linear classifier. DINOv2 (Oquab et al. 2023): the released
# facebook/dinov2-{small,base,large} checkpoints, 22.1M, 86.6M, 304.4M. DINOv3 (Simeoni et al. 2025) gives
# 21M, 86M and 0.3B, rounded, for ViT-S/16, B/16, L/16.
PUBLISHED_MILLIONS = {
    "convnext-tiny": (28.59, 0.01),
    "convnext-base": (88.59, 0.01),
    "convnext-large": (197.77, 0.01),
    "swin-tiny": (28.29, 0.01),
    "swin-base": (87.77, 0.01),
    "dinov2-small": (22.1, 0.05),
    "dinov2-base": (86.6, 0.05),
    "dinov2-large": (304.4, 0.05),
    "dinov3-vits16": (21.0, 0.7),
    "dinov3-vitb16": (86.0, 0.7),
    "dinov3-vitl16": (300.0, 5.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_foundation_presets_have_the_published_sizes(name):
    with torch.device("meta"):  # no memory, no time: shapes only
        model = CPSLForSemanticSegmentation(CPSLConfig.from_preset(name))
    backbone = model.backbone
    encoder = sum(
        p.numel() for key, p in backbone.named_parameters() if not key.startswith("hidden_states_norms")
    )
    if name.startswith(("convnext", "swin")):
        width = model.config.backbone_level_channels[-1]
        encoder += 2 * width + width * 1000 + 1000  # final LayerNorm + ImageNet-1k classifier
    published, tolerance = PUBLISHED_MILLIONS[name]
    assert encoder / 1e6 == pytest.approx(published, abs=tolerance)


def test_foundation_presets_read_four_levels_and_are_recognised():
    expected_layers = {"small": [3, 6, 9, 12], "base": [3, 6, 9, 12], "large": [6, 12, 18, 24]}
    for size, layers in expected_layers.items():
        config = CPSLConfig.from_preset(f"dinov2-{size}")
        assert config.backbone_config.out_indices == layers
        assert config.backbone_config.out_features == [f"stage{layer}" for layer in layers]
    assert CPSLConfig.from_preset("dinov3-vitl16").backbone_config.patch_size == 16
    assert CPSLConfig.from_preset("swin-tiny").backbone_config.out_features == [
        f"stage{i}" for i in (1, 2, 3, 4)
    ]
    for name in PUBLISHED_MILLIONS:
        config = CPSLConfig.from_preset(name)
        assert matching_preset(config) == name
        reloaded = CPSLConfig.from_dict(config.to_dict())
        assert matching_preset(reloaded) == name
    assert describe_architecture(CPSLConfig.from_preset("dinov2-large")) == (
        "DINOv2 ViT (simple feature pyramid) dinov2-large, segformer decode head, D=256"
    )
    assert describe_architecture(CPSLConfig.from_preset("swin-base", embedding_dim=512)) == (
        "Swin Transformer swin-base, segformer decode head, D=512"
    )
    assert matching_preset(tiny_backbone_config("dinov2")) is None
    splus = {  # DINOv3 ViT-S+/16: ViT-S's width and depth, a wider gated MLP; not the vits16 preset
        "model_type": "dinov3_vit",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536 * 3 // 2,
        "use_gated_mlp": True,
        "out_indices": [3, 6, 9, 12],
    }
    assert matching_preset(CPSLConfig(backbone_config=splus)) is None
    chosen = CPSLConfig.from_preset("dinov2-base", out_features=["stage12"])
    assert chosen.backbone_config.out_indices == [12]


# ------------------------------------------------------------------------------- from_pretrained_backbone
ENCODER_CLASSES = {
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
    "dinov3_vit": DINOv3ViTModel,
    "convnext": ConvNextModel,
    "convnextv2": ConvNextV2Model,
    "dinov3_convnext": DINOv3ConvNextModel,
    "swin": SwinModel,
    "swinv2": Swinv2Model,
}


def _save_perturbed(encoder, folder):
    with torch.no_grad():  # every tensor distinct from a fresh init
        for parameter in encoder.parameters():
            parameter.add_(torch.randn_like(parameter))
    encoder.save_pretrained(folder)
    return encoder.state_dict()


@pytest.mark.parametrize("family", sorted(ENCODER_CLASSES))
def test_from_pretrained_backbone_loads_every_encoder_tensor(family, tmp_path):
    torch.manual_seed(0)
    encoder_config = AutoConfig.for_model(**TINY_BACKBONES[family])
    saved = _save_perturbed(ENCODER_CLASSES[family](encoder_config), tmp_path / family)
    model = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path / family), num_labels=16)
    prefix = model.backbone.base_model_prefix + "."  # SwinBackbone keeps its encoder under swin.*

    def saved_name(key):
        return key if key in saved else key.removeprefix(prefix)

    backbone = {saved_name(key): tensor for key, tensor in model.backbone.state_dict().items()}
    shared = set(saved) & set(backbone)
    assert len(shared) > 10
    for key in shared:
        assert torch.equal(backbone[key], saved[key]), key
    info = model.backbone_loading_info
    assert info["missing_keys"] == [] and info["mismatched_keys"] == []
    assert sorted(saved_name(key) for key in info["new_layers"]) == sorted(set(backbone) - set(saved))
    assert info["unexpected_keys"] == sorted(set(saved) - set(backbone))
    if family in ("convnext", "convnextv2", "swin"):  # their backbones add per-stage output norms
        assert info["new_layers"] and all(
            key.startswith("hidden_states_norms.") for key in info["new_layers"]
        )
    else:
        assert info["new_layers"] == []
    if family in PLAIN_VITS:
        assert model.config.backbone_config.out_indices == [1, 2, 3, 4]  # L/4 ... L of 4 layers
    assert model.config.num_labels == 16 and model.config.backbone_type == family
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 45, 61)).logits.shape == (1, 16, 12, 16)


def test_from_pretrained_backbone_reports_a_classifier_and_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    classifier = Dinov2ForImageClassification(AutoConfig.for_model(**TINY_BACKBONES["dinov2"], num_labels=7))
    _save_perturbed(classifier, tmp_path)
    model = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), out_indices=[4])  # ViTDet
    assert model.config.backbone_config.out_indices == [4] and model.neck is not None
    assert model.backbone_loading_info["unexpected_keys"] == ["classifier.bias", "classifier.weight"]
    for key, tensor in classifier.dinov2.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key
    with pytest.raises(ValueError, match="needs 1 layer"):
        CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), out_indices=[2, 4])

    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["dinov2.embeddings.cls_token"]
    save_file(tensors, weights, metadata={"format": "pt"})
    partial = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path))
    assert partial.backbone_loading_info["missing_keys"] == ["embeddings.cls_token"]
    with pytest.raises(ValueError, match="lacks encoder weights"):
        CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), strict=True)


def test_autobackbone_reads_the_levels_transformers_names():
    """The levels CPSL's config asks for are those transformers' own AutoBackbone hands over for that config."""
    config = tiny_backbone_config("swin")
    reference = AutoBackbone.from_config(config.backbone_config)
    assert reference.out_features == ["stage1", "stage2", "stage3", "stage4"]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64)
    model = CPSLForSemanticSegmentation(config).eval()
    reference.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        for ours, theirs in zip(model.autobackbone_levels(pixels), reference.eval()(pixels).feature_maps):
            assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------- UperNet head
@pytest.mark.parametrize("family", ["dinov2", "swin"])
def test_upernet_head_equals_transformers_upernet_head(family):
    """The same logits and weight gradients as transformers' UperNetHead with the same weights, in training
    mode (batch statistics) and in eval mode; the embedding is the fuse's signed BatchNorm output."""
    from transformers.models.upernet.modeling_upernet import UperNetHead

    model = _model(family, decode_head="upernet", classifier_dropout_prob=0.0)
    config = model.config
    assert config.embedding_dim == 32 and config.upernet_pool_scales == [1, 2, 3, 6]
    reference_config = type(
        "HeadConfig", (), {"pool_scales": (1, 2, 3, 6), "hidden_size": 32, "num_labels": 19}
    )
    reference = UperNetHead(reference_config, config.backbone_level_channels).double()
    ours = model.decode_head.double()
    reference.load_state_dict(ours.state_dict())  # the same weight names
    with torch.no_grad():
        levels = [level.double() for level in model.autobackbone_levels(torch.randn(2, 3, 64, 96))]
    for train in (True, False):
        ours.train(train)
        reference.train(train)
        embeddings, logits = ours(levels)
        expected = reference(levels)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
        assert embeddings.shape == (2, 32, 16, 24) and (embeddings < 0).any()
        torch.testing.assert_close(logits, ours.classifier(embeddings.relu()), rtol=0, atol=1e-12)
        upstream = torch.randn(expected.shape, dtype=torch.float64)
        ours_grads = torch.autograd.grad((logits * upstream).sum(), list(ours.parameters()))
        reference_grads = torch.autograd.grad((expected * upstream).sum(), list(reference.parameters()))
        for mine, theirs in zip(ours_grads, reference_grads):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_upernet_is_chosen_by_the_config_and_gives_stride_4():
    config = CPSLConfig.from_preset("dinov2-base", decode_head="upernet")
    assert config.embedding_dim == 512 and "upernet decode head, D=512" in describe_architecture(config)
    model = _model("dinov3_vit", decode_head="upernet", upernet_pool_scales=[1, 2])
    assert (
        type(model.decode_head).__name__ == "CPSLUperNetHead"
        and len(model.decode_head.psp_modules.blocks) == 2
    )
    with torch.no_grad():
        output = model(torch.randn(1, 3, 45, 61), output_embeddings=True)
    assert output.logits.shape == (1, 19, 12, 16) and output.sl_logits.shape == (1, 19, 12, 16)
    with pytest.raises(ValueError, match="decode_head='upernet' does not fit a segformer"):
        CPSLConfig.from_preset("segformer-tiny", decode_head="upernet")
