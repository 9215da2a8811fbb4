"""Where self-training labels come from: hard labels from probabilities, the mirror-averaged softmax of a frozen
model, frozen copies of a network, and ``P_ST`` computed once and kept in memory (``--pseudo_labels offline``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import warp_to_view


def frozen_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` that never trains: no gradients, eval mode."""
    frozen = copy.deepcopy(network)
    frozen.requires_grad_(False)
    return frozen.eval()


def flip_averaged_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax of ``model`` averaged over the images and their horizontal mirror images (mirrored back).

    Args:
        model: returns an output with ``.logits`` N x C x h x w (callers run it under ``torch.no_grad()``).
        images: N x 3 x H x W model input (normalised). Both orientations go through one forward pass.

    Returns:
        N x C x h x w float32 probabilities at the model's output resolution.
    """
    count = images.shape[0]
    probabilities = model(torch.cat([images, images.flip(-1)])).logits.float().softmax(dim=1)
    return (probabilities[:count] + probabilities[count:].flip(-1)) / 2


def hard_pseudo_labels(
    probabilities: torch.Tensor, threshold: float, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Argmax labels of N x C x h x w ``probabilities``; 255 where the maximum is <= ``threshold`` (the
    reference's ``lp[conf <= threshold] = 250``) or where ``valid_mask`` (N x h x w bool) is False.

    Returns:
        N x h x w int64 labels.
    """
    confidence, labels = probabilities.max(dim=1)
    keep = confidence > threshold
    if valid_mask is not None:
        keep = keep & valid_mask
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


class OfflinePseudoLabels:
    """``P_ST`` of the frozen warm-up model over the target training set, computed once and kept in memory.

    Probabilities are stored as float16 at decode resolution: 2 C bytes per decode pixel, i.e. for 19 classes
    311 KB per image for DeepLab-V2 (stride 8) on Cityscapes at 1024 x 512 (0.93 GB for its 2,975 training
    images) and 1.2 MB per image for SegFormer (stride 4; 3.7 GB), the same again in every checkpoint.
    float16 keeps every probability above 6e-8 (relative error 5e-4): a class the warm-up scored low still
    takes part in the rectification product ``P_SL * P_ST`` (uint8 quantisation zeroed everything below 0.002).
    :meth:`lookup` renormalises and maps them onto a weak view with the view's recorded geometry.

    Attributes:
        index: image name -> row of ``probabilities``.
        probabilities: K x C x h x w float16 (CPU).
    """

    def __init__(self, names: list[str], probabilities: torch.Tensor):
        if len(set(names)) != len(names):
            raise ValueError("offline pseudo labels: target image names must be unique")
        self.index = {name: row for row, name in enumerate(names)}
        self.probabilities = probabilities

    @staticmethod
    def compress(probs: torch.Tensor) -> torch.Tensor:
        """N x C x h x w float probabilities -> float16 (the stored form)."""
        return probs.to(torch.float16)

    def lookup(
        self, names: list[str], params, output_size: tuple[int, int], device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_ST`` of the named images on their weak views: (N x C x h x w float32, N x h x w valid mask)."""
        try:
            rows = torch.tensor([self.index[name] for name in names])
        except KeyError as error:
            raise KeyError(f"offline pseudo labels: no stored P_ST for target image {error}") from None
        stored = self.probabilities.index_select(0, rows).to(device, non_blocking=True).float()
        stored = stored / stored.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return warp_to_view(stored, params, output_size, mode="bilinear")

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.index), "probabilities": self.probabilities}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OfflinePseudoLabels:
        return cls(state["names"], state["probabilities"])
