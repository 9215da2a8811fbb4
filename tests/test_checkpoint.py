"""Saved checkpoints load three ways: with the package (Auto classes), as remote code, and in a pipeline."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from backbone_helpers import TINY_BACKBONES, tiny_backbone_config
from PIL import Image
from torch.nn import functional as F
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

import cpsl_hf
from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation
from cpsl_hf.data.protocols import class_names

TINY_RESNET = {
    "model_type": "resnet",
    "embedding_size": 8,
    "hidden_sizes": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "layer_type": "bottleneck",
}
CONFIGS = {
    "segformer": lambda: CPSLConfig.from_preset("segformer-tiny"),
    "deeplabv2": lambda: CPSLConfig(backbone_config=dict(TINY_RESNET), embedding_dim=32),
    # Every AutoBackbone family (tests/backbone_helpers.py): DINOv2 (with registers), DINOv3, ConvNeXt (V2), Swin.
    **{family: (lambda family=family: tiny_backbone_config(family)) for family in TINY_BACKBONES},
    "dinov2-upernet": lambda: tiny_backbone_config("dinov2", decode_head="upernet"),
}


def _perturb_running_statistics(model: CPSLForSemanticSegmentation) -> None:
    """Give every BatchNorm non-default running statistics and every LayerNorm a non-default affine map, so a
    load that missed buffers or re-initialised a norm (the ViT pyramid's, a backbone's) would show."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        elif isinstance(module, torch.nn.LayerNorm):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, model in eval mode, pixels, reference output with embeddings)."""
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {}
    for name, factory in CONFIGS.items():
        torch.manual_seed(0)
        model = CPSLForSemanticSegmentation(factory()).eval()
        _perturb_running_statistics(model)
        folder = root / name
        model.save_pretrained(folder)
        pixels = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = model(pixels, output_embeddings=True)
        saved[name] = (folder, model, pixels, reference)
    return saved


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_folder_layout(checkpoints, name):
    folder = checkpoints[name][0]
    files = sorted(os.listdir(folder))
    assert files == [
        "config.json",
        "configuration_cpsl.py",
        "model.safetensors",
        "modeling_cpsl.py",
        "preprocessor_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cpsl"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cpsl.CPSLConfig",
        "AutoModel": "modeling_cpsl.CPSLForSemanticSegmentation",
        "AutoModelForSemanticSegmentation": "modeling_cpsl.CPSLForSemanticSegmentation",
    }
    assert "from .configuration_cpsl import" in (folder / "modeling_cpsl.py").read_text()
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SegformerImageProcessor"
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [
        0.229,
        0.224,
        0.225,
    ]
    assert processor["rescale_factor"] == pytest.approx(1 / 255) and processor["do_resize"] is False


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForSemanticSegmentation])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gives_identical_outputs(checkpoints, name, auto_class):
    folder, model, pixels, reference = checkpoints[name]
    assert type(AutoConfig.from_pretrained(folder)) is CPSLConfig
    loaded = auto_class.from_pretrained(folder).eval()
    assert type(loaded) is CPSLForSemanticSegmentation
    with torch.no_grad():
        output = loaded(pixels, output_embeddings=True)
    assert (output.logits - reference.logits).abs().max().item() == 0
    assert (output.sl_logits - reference.sl_logits).abs().max().item() == 0
    original_state = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original_state[key]), key
    loaded_backbone, original_backbone = (
        {key: value for key, value in config.to_dict()["backbone_config"].items() if key != "dtype"}
        for config in (loaded.config, model.config)
    )
    assert loaded_backbone == original_backbone


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    # cpsl_hf is findable here (installed, or on PYTHONPATH) ...
    assert importlib.util.find_spec("cpsl_hf") is not None, "cpsl_hf not findable: the block would prove nothing"

    class BlockCpslHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cpsl_hf" or name.startswith("cpsl_hf."):
                raise ImportError(f"cpsl_hf is blocked in this process ({name})")

    # ... and after this line it cannot be imported any more.
    sys.meta_path.insert(0, BlockCpslHf())
    try:
        import cpsl_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the block failed: cpsl_hf was importable")

    import torch
    from transformers import AutoModel, AutoModelForSemanticSegmentation

    pixels_file, output_file, *folders = sys.argv[1:]
    pixels = torch.load(pixels_file)
    results = {}
    for folder in folders:
        for auto_class in (AutoModel, AutoModelForSemanticSegmentation):
            model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                results[f"{folder}|{auto_class.__name__}"] = model(pixels[folder]).logits
    assert not any(name.startswith("cpsl_hf") for name in sys.modules), "cpsl_hf leaked into the process"
    torch.save(results, output_file)
    print("REMOTE-OK")
    """
)


def test_trust_remote_code_without_the_package(checkpoints, tmp_path):
    """A fresh process where cpsl_hf is findable (PYTHONPATH) but blocked loads both checkpoints as remote code."""
    pixels = {str(folder): pixels for folder, _, pixels, _ in checkpoints.values()}
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    repository_root = str(Path(cpsl_hf.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=repository_root, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    command = [sys.executable, "remote.py", "pixels.pt", "logits.pt", *pixels]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "REMOTE-OK" in completed.stdout
    results = torch.load(tmp_path / "logits.pt")
    assert len(results) == 2 * len(checkpoints)
    for folder, _, _, reference in checkpoints.values():
        for auto_class in ("AutoModel", "AutoModelForSemanticSegmentation"):
            logits = results[f"{folder}|{auto_class}"]
            assert (logits - reference.logits).abs().max().item() == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pipeline_returns_one_mask_per_present_class_at_input_size(checkpoints, name):
    folder, model, _, _ = checkpoints[name]
    rng = np.random.default_rng(0)
    width, height = 53, 37
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(folder))
    annotations = segmenter(image)

    # Independent computation: normalise by hand, run the model, upsample to the image size, argmax.
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        logits = model((array - mean) / std).logits
    prediction = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).argmax(1)[
        0
    ]
    present = torch.unique(prediction).tolist()
    names = class_names(19)

    assert [annotation["label"] for annotation in annotations] == [names[index] for index in present]
    for annotation, index in zip(annotations, present):
        mask = np.asarray(annotation["mask"])
        assert annotation["mask"].size == (width, height)
        np.testing.assert_array_equal(mask == 255, (prediction == index).numpy())
    union = sum((np.asarray(annotation["mask"]) == 255).astype(int) for annotation in annotations)
    assert (union == 1).all()
    processor = AutoImageProcessor.from_pretrained(folder)
    np.testing.assert_allclose(
        processor(image, return_tensors="pt")["pixel_values"], (array - mean) / std, atol=1e-6
    )
