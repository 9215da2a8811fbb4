"""Fine-tuning options for foundation-model backbones: --layer_decay, --freeze_backbone, --gradient_checkpointing."""

import sys
from pathlib import Path

import pytest
import torch
from training_helpers import run, tiny_argv
from transformers import AutoConfig, ConvNextModel, Dinov2Model, DINOv3ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny backbone configs
from backbone_helpers import TINY_BACKBONES  # noqa: E402

from cpsl_hf.training.arguments import ConfigurationError, parse_args  # noqa: E402
from cpsl_hf.training.building import build_model, parameter_groups  # noqa: E402

ENCODERS = {"dinov2": Dinov2Model, "dinov3_vit": DINOv3ViTModel, "convnext": ConvNextModel}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """family -> folder of a tiny random encoder saved by transformers (4 blocks / stages)."""
    root = tmp_path_factory.mktemp("encoders")
    folders = {}
    for family, encoder_class in ENCODERS.items():
        torch.manual_seed(0)
        encoder_class(AutoConfig.for_model(**TINY_BACKBONES[family])).save_pretrained(root / family)
        folders[family] = root / family
    return folders


def _args(tmp_path, cache, *flags):
    return parse_args(tiny_argv(tmp_path, cache, *flags))


def _expected_rate(name: str, decay: float, num_layers: int = 4) -> float:
    """BEiT's layer decay written out: embeddings decay^(L+1), block i decay^(L-i), the final norm 1."""
    if name.startswith("embeddings."):
        return decay ** (num_layers + 1)
    for prefix in ("encoder.layer.", "model.layer."):
        if name.startswith(prefix):
            block = int(name[len(prefix) :].split(".")[0])
            return decay ** (num_layers - block)
    assert name.startswith(("layernorm.", "norm.")), name
    return 1.0


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit"])
def test_layer_decay_gives_each_vit_parameter_the_documented_rate(
    family, encoders, tmp_path, synthetic_cache
):
    args = _args(tmp_path, synthetic_cache, "--backbone", str(encoders[family]), "--layer_decay", "0.75")
    model = build_model(args)
    network, prototypes = parameter_groups(model, args)
    lr = args.training.learning_rate
    group_of = {id(parameter): group for group in network for parameter in group["params"]}
    backbone_parameters = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert len(backbone_parameters) > 20
    assert not model.backbone.embeddings.mask_token.requires_grad  # unused by segmentation: frozen
    for name, parameter in backbone_parameters:
        assert group_of[id(parameter)]["lr"] == pytest.approx(lr * _expected_rate(name, 0.75), rel=1e-12), (
            name
        )
    names = [group["name"] for group in network]
    assert names == ["backbone_embeddings", *[f"backbone_block{i}" for i in range(4)], "backbone", "head"]
    head = next(group for group in network if group["name"] == "head")
    assert head["lr"] == lr and {id(p) for p in model.neck.parameters()} <= {id(p) for p in head["params"]}
    every = [id(p) for group in network for p in group["params"]] + [id(p) for p in prototypes["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(every) == sorted(trainable)  # each trainable parameter exactly once


def test_layer_decay_ratios_hold_through_the_schedule_of_a_run(encoders, tmp_path, synthetic_cache):
    trainer = run(
        tiny_argv(tmp_path, synthetic_cache, "--backbone", str(encoders["dinov2"]), "--layer_decay", "0.5")
    )
    logged = [entry for entry in trainer.log_history if entry["lr_backbone"] > 0]
    assert (
        len(logged) >= 2 and len({entry["lr_backbone"] for entry in logged}) >= 2
    )  # the poly schedule moves
    for entry in logged:
        for block in range(4):
            ratio = entry[f"lr_backbone_block{block}"] / entry["lr_backbone"]
            assert ratio == pytest.approx(0.5 ** (4 - block), rel=1e-9)
        assert entry["lr_backbone_embeddings"] / entry["lr_backbone"] == pytest.approx(0.5**5, rel=1e-9)


def test_layer_decay_needs_a_plain_vit_and_a_rate_in_the_unit_interval(encoders, tmp_path, synthetic_cache):
    args = _args(tmp_path, synthetic_cache, "--backbone", str(encoders["convnext"]), "--layer_decay", "0.9")
    with pytest.raises(ConfigurationError, match="--layer_decay is for plain ViT backbones.*convnext"):
        parameter_groups(build_model(args), args)
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigurationError, match=f"--layer_decay {float(bad)} must be in"):
            _args(tmp_path, synthetic_cache, "--layer_decay", bad)


def test_freeze_backbone_trains_only_the_pyramid_and_heads(encoders, tmp_path, synthetic_cache):
    folder = encoders["dinov2"]
    trainer = run(tiny_argv(tmp_path, synthetic_cache, "--backbone", str(folder), "--freeze_backbone"))
    pretrained = Dinov2Model.from_pretrained(folder).state_dict()
    student = trainer.student
    for key, tensor in student.backbone.state_dict().items():
        assert torch.equal(tensor, pretrained[key]), key
    assert not any(parameter.requires_grad for parameter in student.backbone.parameters())
    groups = [group["name"] for group in trainer.optimizer.optimizer.param_groups]
    assert "backbone" not in groups and "head" in groups
    fresh = build_model(_args(tmp_path / "fresh", synthetic_cache, "--backbone", str(folder), "--seed", "0"))
    assert any(
        not torch.equal(trained, initial)
        for trained, initial in zip(student.neck.parameters(), fresh.neck.parameters())
    )


def _gradients(model, pixels, labels):
    torch.manual_seed(3)  # the same dropout masks in both runs
    model.train()
    model.zero_grad()
    model(pixels, labels=labels).loss.backward()
    return {  # the mask token and W get no gradient from the segmentation loss
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit"])
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(
    family, encoders, tmp_path, synthetic_cache
):
    flags = ("--backbone", str(encoders[family]))
    plain = build_model(_args(tmp_path / "a", synthetic_cache, *flags))
    checkpointed = build_model(_args(tmp_path / "b", synthetic_cache, *flags, "--gradient_checkpointing"))
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    first_block = next(
        module for name, module in checkpointed.backbone.named_modules() if name.endswith("layer.0")
    )
    inside_block = next(first_block.children())  # the block's forward (not its __call__) is what is re-run
    inside_block.register_forward_hook(lambda module, inputs, output: calls.append(1))
    pixels = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 19, (2, 45, 61), generator=torch.Generator().manual_seed(1))
    expected = _gradients(plain, pixels, labels)
    calls.clear()
    gradients = _gradients(checkpointed, pixels, labels)
    assert len(calls) == 2  # the block ran in the forward and again in the backward
    assert gradients.keys() == expected.keys() and len(expected) > 40
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_names_a_backbone_without_support(encoders, tmp_path, synthetic_cache):
    args = _args(
        tmp_path, synthetic_cache, "--backbone", str(encoders["convnext"]), "--gradient_checkpointing"
    )
    with pytest.raises(ConfigurationError, match="--gradient_checkpointing: the convnext backbone"):
        build_model(args)


RECIPES = {
    "gta5_cityscapes_dinov2_large.yaml": "dinov2-large",
    "gta5_cityscapes_dinov3_vitl16.yaml": "dinov3-vitl16",
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_foundation_recipes_parse_and_fit_a_24_gb_card(recipe, tmp_path):
    from cpsl_hf import CPSLConfig
    from cpsl_hf.training.memory import GIB, estimate_memory

    path = Path(__file__).resolve().parents[2] / "configs" / recipe
    args = parse_args(["--config", str(path), "--source_dir", str(tmp_path), "--target_dir", str(tmp_path)])
    training = args.training
    assert (training.optimizer, training.layer_decay, training.mixed_precision) == ("adamw", 0.9, "bf16")
    assert args.data.crop_size == [512, 512] and training.source_batch_size == training.target_batch_size == 2
    assert training.cpsl_steps == 40000 and args.cpsl.pseudo_labels == "frozen"
    batch = training.source_batch_size + training.target_batch_size
    for checkpointed, budget in ((False, 16), (True, 10)):  # GiB, before the CUDA context and fragmentation
        estimate = estimate_memory(
            CPSLConfig.from_preset(RECIPES[recipe]),
            tuple(args.data.crop_size),
            batch,
            activation_dtype=torch.bfloat16,
            gradient_checkpointing=checkpointed,
        )
        assert estimate.fused_attention_total_bytes / GIB < budget
