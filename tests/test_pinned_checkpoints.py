"""Checkpoints saved by earlier versions of the package load with today's code and give the same outputs.

``tests/fixtures/pinned/<family>/`` are tiny checkpoints written by ``save_pretrained`` before the AutoBackbone
families were added (commit ba26895): a SegFormer (MiT) one and a DeepLab-V2 ResNet + ProDA one, 5 classes,
non-default BatchNorm running statistics (without the remote-code copies ``save_pretrained`` writes beside them:
the test loads through the package, so they were never read). ``expected_outputs.safetensors`` beside each holds the pixels
(2 x 3 x 40 x 56, ``torch.randn`` with generator seed 2) and the logits, embeddings and self-labeling logits that
the code of that commit computed for them in eval mode. Today's modeling code must reproduce them bit for bit.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpsl_hf import CPSLForSemanticSegmentation

PINNED = Path(__file__).parent / "fixtures" / "pinned"
FAMILIES = ["segformer", "deeplabv2-proda"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pinned_checkpoint_gives_the_recorded_outputs(family):
    folder = PINNED / family
    expected = load_file(folder / "expected_outputs.safetensors")
    model = CPSLForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        output = model(expected["pixels"], output_embeddings=True)
    for name in ("logits", "embeddings", "sl_logits"):
        assert torch.equal(getattr(output, name), expected[name]), name
