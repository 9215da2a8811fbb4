"""CPSLConfig / CPSLForSemanticSegmentation: presets, shapes, strides, losses, heads, encoder loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
    SegformerConfig,
    SegformerModel,
)

from cpsl_hf import PRESETS, CPSLConfig, CPSLForSemanticSegmentation
from cpsl_hf.data.protocols import class_names
from cpsl_hf.modeling_cpsl import dilate_resnet_

TINY_RESNET = {
    "model_type": "resnet",
    "embedding_size": 8,
    "hidden_sizes": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
}


def tiny_resnet_config(**overrides) -> CPSLConfig:
    if overrides.get("decode_head", "proda") == "proda":
        overrides.setdefault("embedding_dim", 32)
    return CPSLConfig(backbone_config=dict(TINY_RESNET), **overrides)


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# Encoder sizes published with SegFormer (Xie et al. 2021, Table 1 / MiT-B0..B5) and ResNet-101 without its fc.
PUBLISHED_ENCODER_MILLIONS = {
    "segformer-b0": 3.3,
    "segformer-b1": 13.1,
    "segformer-b2": 24.2,
    "segformer-b3": 44.0,
    "segformer-b4": 60.8,
    "segformer-b5": 81.4,
    "deeplabv2-r101": 42.5,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_ENCODER_MILLIONS))
def test_real_presets_have_published_encoder_sizes(name):
    with torch.device("meta"):
        model = CPSLForSemanticSegmentation(CPSLConfig.from_preset(name))
    assert count(model.backbone) / 1e6 == pytest.approx(PUBLISHED_ENCODER_MILLIONS[name], abs=0.1)


def test_preset_architecture_fields():
    decoder = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}
    for variant, width in decoder.items():
        config = CPSLConfig.from_preset(f"segformer-{variant}")
        assert config.backbone_config.decoder_hidden_size == width == config.embedding_dim
        assert config.decode_head == "segformer" and config.output_stride == 4
    r101 = CPSLConfig.from_preset("deeplabv2-r101")
    assert r101.backbone_config.depths == [3, 4, 23, 3]
    assert (r101.decode_head, r101.embedding_dim, r101.output_stride) == ("proda", 256, 8)
    assert r101.resnet_stage_dilations == [1, 1, 2, 4]


def test_tiny_preset_is_under_one_million_parameters():
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny"))
    assert 800_000 < count(model) < 1_000_000
    assert model.config.backbone_config.depths == [2, 2, 2, 2]
    assert model.config.backbone_config.hidden_sizes == [16, 32, 64, 128]
    assert model.config.embedding_dim == 128


@pytest.mark.parametrize("num_labels", [19, 16, 13])
def test_default_class_names_are_the_protocol_names(num_labels):
    config = CPSLConfig.from_preset("segformer-tiny", num_labels=num_labels)
    assert config.num_labels == num_labels
    assert [config.id2label[index] for index in range(num_labels)] == class_names(num_labels)
    assert config.label2id == {name: index for index, name in enumerate(class_names(num_labels))}


def test_overrides_are_routed_and_validated():
    config = CPSLConfig.from_preset("segformer-tiny", sl_temperature=0.1, drop_path_rate=0.0)
    assert config.sl_temperature == 0.1 and config.backbone_config.drop_path_rate == 0.0
    custom = CPSLConfig.from_preset("segformer-tiny", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    assert custom.id2label == {0: "a", 1: "b", 2: "c"} and custom.label2id == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="unknown override 'not_a_field'"):
        CPSLConfig.from_preset("segformer-tiny", not_a_field=1)
    with pytest.raises(ValueError, match="unknown preset"):
        CPSLConfig.from_preset("segformer-b9")
    with pytest.raises(ValueError, match="decode_head='proda' does not fit a segformer"):
        CPSLConfig.from_preset("segformer-tiny", decode_head="proda")
    with pytest.raises(ValueError, match="output_stride=8 is not possible for SegFormer"):
        CPSLConfig.from_preset("segformer-tiny", output_stride=8)
    with pytest.raises(ValueError, match="embedding_dim=64 but the 'segformer' head"):
        CPSLConfig.from_preset("segformer-tiny", embedding_dim=64)
    with pytest.raises(ValueError, match="output_stride=4 for a ResNet"):
        tiny_resnet_config(output_stride=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        CPSLConfig(backbone_config=dict(TINY_RESNET), embedding_dim=40)
    with pytest.raises(ValueError, match="model_type='vit'"):
        CPSLConfig(backbone_config={"model_type": "vit"})


@pytest.mark.parametrize(
    ("config_factory", "stride"),
    [
        (lambda: CPSLConfig.from_preset("segformer-tiny"), 4),
        (lambda: tiny_resnet_config(), 8),
        (lambda: tiny_resnet_config(decode_head="deeplabv2"), 8),
        (lambda: tiny_resnet_config(output_stride=16), 16),
        (lambda: tiny_resnet_config(output_stride=32), 32),
    ],
)
def test_output_strides_and_shapes(config_factory, stride):
    torch.manual_seed(0)
    config = config_factory()
    model = CPSLForSemanticSegmentation(config).eval()
    height, width = 64, 96
    with torch.no_grad():
        output = model(torch.randn(2, 3, height, width), output_embeddings=True)
    grid = (height // stride, width // stride)
    assert output.logits.shape == (2, config.num_labels, *grid)
    assert output.embeddings.shape == (2, config.embedding_dim, *grid)
    assert output.sl_logits.shape == (2, config.num_labels, *grid)
    assert output.loss is None
    plain = model(torch.randn(1, 3, height, width))
    assert plain.embeddings is None and plain.sl_logits is None


def test_segformer_embedding_is_signed_before_the_relu_and_the_logits_do_not_change():
    torch.manual_seed(0)
    relu = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny")).eval()
    assert relu.config.segformer_embedding == "post_activation"  # the default of new models
    signed = CPSLForSemanticSegmentation(
        CPSLConfig.from_preset("segformer-tiny", segformer_embedding="pre_activation")
    ).eval()
    signed.load_state_dict(relu.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_signed = signed(pixels, output_embeddings=True)
        out_relu = relu(pixels, output_embeddings=True)
        features = signed.backbone(pixels, output_hidden_states=True).hidden_states
        head = signed.decode_head
        projected = [
            torch.nn.functional.interpolate(
                torch.einsum("oc,nchw->nohw", p.proj.weight, f) + p.proj.bias[:, None, None],
                size=features[0].shape[2:],
                mode="bilinear",
                align_corners=False,
            )
            for f, p in zip(features, head.linear_projections)
        ]
        normalized = head.batch_norm(head.linear_fuse(torch.cat(projected[::-1], dim=1)))
    torch.testing.assert_close(out_signed.embeddings, normalized)
    torch.testing.assert_close(out_relu.embeddings, normalized.relu())
    assert (out_signed.embeddings < 0).any() and not (out_relu.embeddings < 0).any()
    torch.testing.assert_close(out_signed.logits, out_relu.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="segformer_embedding"):
        CPSLConfig.from_preset("segformer-tiny", segformer_embedding="relu")


def test_deeplabv2_embedding_is_the_backbone_feature():
    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(tiny_resnet_config(decode_head="deeplabv2")).eval()
    assert model.config.embedding_dim == TINY_RESNET["hidden_sizes"][-1]
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        output = model(pixels, output_embeddings=True)
        feature = model.backbone(pixels).last_hidden_state
        expected_logits = sum(branch(feature) for branch in model.decode_head.branches)
    assert torch.equal(output.embeddings, feature)
    torch.testing.assert_close(output.logits, expected_logits)


def test_dilation_keeps_resnet_weight_names_and_shapes():
    config = ResNetConfig(**{key: value for key, value in TINY_RESNET.items() if key != "model_type"})
    plain = ResNetModel(config)
    dilated = dilate_resnet_(ResNetModel(config), [1, 1, 2, 4])
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in dilated.state_dict().items()
    }
    dilated.load_state_dict(plain.state_dict())
    convs = [m for m in dilated.encoder.stages[3].modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.stride == (1, 1) for conv in convs)
    assert {conv.dilation for conv in convs if conv.kernel_size == (3, 3)} == {(4, 4)}
    with torch.no_grad():
        pixels = torch.randn(1, 3, 64, 64)
        assert plain.eval()(pixels).last_hidden_state.shape[-2:] == (2, 2)
        assert dilated.eval()(pixels).last_hidden_state.shape[-2:] == (8, 8)


def test_sl_logits_are_cosine_similarities_over_temperature():
    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=5)).eval()
    assert model.self_labeling_head.temperature == pytest.approx(0.08)
    assert model.self_labeling_head.prototypes.shape == (5, 128)
    with torch.no_grad():
        output = model(torch.randn(1, 3, 32, 32), output_embeddings=True)
    pixel_embedding = output.embeddings[0, :, 3, 5]  # D
    expected = torch.stack(
        [
            F.cosine_similarity(pixel_embedding, prototype, dim=0)
            for prototype in model.self_labeling_head.prototypes
        ]
    )
    torch.testing.assert_close(output.sl_logits[0, :, 3, 5], expected / 0.08, rtol=1e-5, atol=1e-5)


def test_loss_is_cross_entropy_at_label_resolution_with_ignore():
    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=4)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 40, 24))
    labels[:, :10] = 255
    with torch.no_grad():
        output = model(pixels, labels=labels)
        upsampled = F.interpolate(output.logits, size=(40, 24), mode="bilinear", align_corners=False)
    log_probs = upsampled.log_softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != 255
    expected = -log_probs[valid, flat_labels[valid]].mean()
    torch.testing.assert_close(output.loss, expected)
    as_tuple = model(pixels, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], expected)


def test_loss_is_zero_with_a_zero_gradient_when_no_pixel_is_labelled():
    """One behaviour with the trainer's masked cross-entropy: 0, not F.cross_entropy's NaN, and backward works."""
    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=4)).train()
    pixels = torch.randn(2, 3, 32, 32)
    nothing = torch.full((2, 40, 24), 255)
    with torch.no_grad():
        logits = model(pixels).logits
    upsampled = F.interpolate(logits, size=(40, 24), mode="bilinear", align_corners=False)
    assert torch.isnan(F.cross_entropy(upsampled, nothing, ignore_index=255))  # what the loss used to be

    output = model(pixels, labels=nothing)
    assert output.loss.item() == 0.0 and output.loss.requires_grad
    output.loss.backward()
    grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert len(grads) > 10  # the graph reaches the backbone and the decode head
    assert all(torch.count_nonzero(grad) == 0 for grad in grads)
    assert model(pixels, labels=nothing, return_dict=False)[0].item() == 0.0


def test_loss_of_a_batch_with_an_unlabelled_image_is_the_mean_over_labelled_pixels():
    torch.manual_seed(1)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=4)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 40, 24))
    labels[0] = 255  # the first image has no labelled pixel, the second only some
    labels[1, :, :7] = 255
    with torch.no_grad():
        output = model(pixels, labels=labels)
    upsampled = F.interpolate(output.logits, size=(40, 24), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels, ignore_index=255)
    assert torch.isfinite(expected)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.segmentation_loss(output.logits, labels), expected, rtol=1e-6, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the loss stays float32
        assert model(pixels, labels=labels).loss.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny"))
    with pytest.raises(TypeError, match="ImageNet-normalised floats"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="labels must be N x H x W"):
        model(torch.zeros(1, 3, 32, 32), labels=torch.zeros(1, 1, 32, 32, dtype=torch.long))


@pytest.mark.parametrize("factory", [lambda: CPSLConfig.from_preset("segformer-tiny"), tiny_resnet_config])
def test_parameter_groups_partition_trainable_parameters(factory):
    model = CPSLForSemanticSegmentation(factory())
    first_backbone_parameter = next(model.backbone.parameters())
    first_backbone_parameter.requires_grad_(False)
    groups = model.parameter_groups()
    assert set(groups) == {"backbone", "head", "prototypes"}
    assert groups["prototypes"] == [model.self_labeling_head.prototypes]
    ids = [id(parameter) for group in groups.values() for parameter in group]
    trainable = {id(parameter) for parameter in model.parameters() if parameter.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert id(first_backbone_parameter) not in ids
    assert {id(p) for p in groups["head"]} == {id(p) for p in model.decode_head.parameters()}


def test_init_covers_every_parameter_and_distinct_seeds_differ():
    torch.manual_seed(0)
    first = CPSLForSemanticSegmentation(tiny_resnet_config())
    torch.manual_seed(1)
    second = CPSLForSemanticSegmentation(tiny_resnet_config())
    prototypes = first.self_labeling_head.prototypes
    assert torch.isfinite(prototypes).all()
    assert prototypes.std().item() == pytest.approx(0.02, rel=0.3)
    assert not torch.equal(prototypes, second.self_labeling_head.prototypes)
    assert first.decode_head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.3)
    fan_in = first.decode_head.fuse.weight[0].numel()
    assert first.decode_head.fuse.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.2)
    deeplab = CPSLForSemanticSegmentation(tiny_resnet_config(decode_head="deeplabv2"))
    assert deeplab.decode_head.branches[0].weight.std().item() == pytest.approx(0.01, rel=0.2)
    for parameter in first.parameters():
        assert torch.isfinite(parameter).all()


# ------------------------------------------------------------------------------- from_pretrained_backbone
def _assert_backbone_equals(model, state_dict):
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state_dict)
    for key, tensor in state_dict.items():
        assert torch.equal(loaded[key], tensor), key


def test_from_pretrained_backbone_loads_every_segformer_weight(tmp_path):
    torch.manual_seed(0)
    encoder_config = SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=32,
    )
    encoder = SegformerModel(encoder_config)
    with torch.no_grad():  # make running statistics / every tensor distinct from a fresh init
        for parameter in encoder.parameters():
            parameter.add_(torch.randn_like(parameter))
    encoder.save_pretrained(tmp_path / "mit")
    model = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path / "mit"), num_labels=16)
    _assert_backbone_equals(model, encoder.state_dict())
    assert model.backbone_loading_info == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "new_layers": [],
    }
    assert model.config.num_labels == 16 and model.config.id2label[15] == "bicycle"
    assert model.config.embedding_dim == 32 and model.config.backbone_config.hidden_sizes == [8, 16, 24, 32]
    assert "LABEL_999" not in json.dumps(model.config.to_dict())  # the encoder's own classes are dropped


def test_from_pretrained_backbone_resnet_reports_unexpected_and_missing(tmp_path):
    torch.manual_seed(0)
    resnet_config = ResNetConfig(**{k: v for k, v in TINY_RESNET.items() if k != "model_type"}, num_labels=5)
    classifier = ResNetForImageClassification(resnet_config)
    with torch.no_grad():
        for parameter in classifier.parameters():
            parameter.add_(torch.randn_like(parameter))
    classifier.save_pretrained(tmp_path / "resnet")
    model = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path / "resnet"), embedding_dim=32)
    _assert_backbone_equals(model, classifier.resnet.state_dict())
    assert model.backbone_loading_info["unexpected_keys"] == ["classifier.1.bias", "classifier.1.weight"]
    assert model.backbone_loading_info["missing_keys"] == []
    assert model.config.output_stride == 8 and model.config.decode_head == "proda"

    weights_file = tmp_path / "resnet" / "model.safetensors"
    tensors = load_file(weights_file)
    dropped = "resnet.embedder.embedder.convolution.weight"
    del tensors[dropped]
    save_file(tensors, weights_file, metadata={"format": "pt"})
    partial = CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path / "resnet"), embedding_dim=32)
    assert partial.backbone_loading_info["missing_keys"] == ["embedder.embedder.convolution.weight"]
    with pytest.raises(ValueError, match="lacks encoder weights"):
        CPSLForSemanticSegmentation.from_pretrained_backbone(
            str(tmp_path / "resnet"), embedding_dim=32, strict=True
        )


def test_from_pretrained_backbone_rejects_other_architectures(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='bert'"):
        CPSLForSemanticSegmentation.from_pretrained_backbone(str(tmp_path))


def test_presets_registry_names():
    assert set(PRESETS) == {f"segformer-b{i}" for i in range(6)} | {"segformer-tiny", "deeplabv2-r101"} | {
        "dinov2-small",
        "dinov2-base",
        "dinov2-large",
        "dinov3-vits16",
        "dinov3-vitb16",
        "dinov3-vitl16",
        "convnext-tiny",
        "convnext-base",
        "convnext-large",
        "swin-tiny",
        "swin-base",
    }


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])
def test_segformer_head_equals_transformers_segformer_decode_head(size):
    """The folded head (each level's projection and fuse block as one affine map at the level's resolution,
    upsampled and summed) gives transformers' SegformerDecodeHead's logits and weight gradients, with the same
    weights, in training mode (batch statistics) and in eval mode."""
    from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

    torch.manual_seed(0)
    config = CPSLConfig.from_preset("segformer-tiny", classifier_dropout_prob=0.0)
    model = CPSLForSemanticSegmentation(config)
    reference_config = model.backbone.config
    reference_config.num_labels, reference_config.classifier_dropout_prob = config.num_labels, 0.0
    reference = SegformerDecodeHead(reference_config).double()
    ours = model.decode_head.double()
    reference.load_state_dict(ours.state_dict())  # the same weight names
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, *size), output_hidden_states=True).hidden_states
    features = [f.double() for f in features]
    for train in (True, False):
        ours.train(train)
        reference.train(train)
        _, logits = ours(features)
        expected = reference(features)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
        upstream = torch.randn(expected.shape, dtype=torch.float64)
        ours_grads = torch.autograd.grad((logits * upstream).sum(), list(ours.parameters()))
        reference_grads = torch.autograd.grad((expected * upstream).sum(), list(reference.parameters()))
        for mine, theirs in zip(ours_grads, reference_grads):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_mask_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales():
    from cpsl_hf.modeling_cpsl import MaskDropout

    torch.manual_seed(0)
    dropout = MaskDropout(0.25)
    features = torch.rand(64, 32, 32, dtype=torch.float64) + 0.5
    features.requires_grad_()
    dropped = dropout(features)
    kept = dropped != 0
    share = kept.double().mean().item()
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / kept.numel()) ** 0.5  # within 4 standard deviations
    torch.testing.assert_close(dropped[kept], features[kept] / 0.75, rtol=0, atol=1e-12)
    (gradient,) = torch.autograd.grad(dropped.sum(), features)
    torch.testing.assert_close(gradient, kept.double() / 0.75, rtol=0, atol=1e-12)
    assert not torch.equal(dropout(features), dropped)  # a new mask per call
    dropout.eval()
    assert dropout(features) is features
    assert MaskDropout(0.0).train()(features) is features
