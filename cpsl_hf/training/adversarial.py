"""Output-space adversarial warm-up (AdaptSegNet, Tsai et al. CVPR 2018): the CPSL reference's ``warm_up``.

A fully-convolutional discriminator ``D`` looks at the segmentation softmax and tells source (label 0) from
target (label 1) patches. The student (generator) learns ``L = L_src + lambda_adv * L_adv`` with
``L_adv = loss(D(P_target), 0)`` (fool ``D``: target outputs should look like source ones), ``D``'s parameters
frozen; then ``D`` learns ``L_D = loss(D(P_source), 0) + loss(D(P_target), 1)`` on detached outputs. ``loss`` is
``BCEWithLogits`` (``vanilla`` GAN) or the mean squared error (``ls``, least-squares GAN; the reference's).

Reference: lslrh/CPSL ``models/adaptation_modelv2.py`` (``step_adv``), AdaptSegNet's ``FCDiscriminator``.
Plain torch: the trainer wires it into the warm-up stage (``--warmup_adversarial``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_DOMAIN = 0.0
"""Discriminator label of source outputs (the generator's target for target outputs)."""
TARGET_DOMAIN = 1.0
"""Discriminator label of target outputs."""
DISCRIMINATOR_STRIDE = 32
"""Five 4 x 4 stride-2 convolutions: the smallest input side giving one output patch."""

AdversarialLoss = Literal["vanilla", "ls"]


class OutputDiscriminator(nn.Module):
    """AdaptSegNet's fully-convolutional discriminator on class probability maps.

    Four 4 x 4 stride-2 convolutions (``ndf``, 2 ``ndf``, 4 ``ndf``, 8 ``ndf`` channels; 64-128-256-512 by
    default), each followed by LeakyReLU(0.2), then a 1-channel 4 x 4 stride-2 classifier (no activation: the
    outputs are logits). Every layer halves the side (padding 1), so an ``H x W`` input gives
    ``H/32 x W/32`` patch logits (floors); sides below 32 are refused.

    Args:
        num_classes: C, the channels of the probability maps.
        ndf: channels of the first layer.
    """

    def __init__(self, num_classes: int, ndf: int = 64):
        super().__init__()
        channels = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        self.features = nn.Sequential(
            *(
                layer
                for index in range(4)
                for layer in (
                    nn.Conv2d(channels[index], channels[index + 1], kernel_size=4, stride=2, padding=1),
                    nn.LeakyReLU(negative_slope=0.2, inplace=True),
                )
            )
        )
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        """N x C x H x W probabilities -> N x 1 x H/32 x W/32 domain logits (> 0: "target")."""
        height, width = probabilities.shape[-2:]
        if height < DISCRIMINATOR_STRIDE or width < DISCRIMINATOR_STRIDE:
            raise ValueError(
                f"OutputDiscriminator: input of {height} x {width} pixels; it needs at least "
                f"{DISCRIMINATOR_STRIDE} x {DISCRIMINATOR_STRIDE} (five stride-2 layers)"
            )
        return self.classifier(self.features(probabilities))


def domain_loss(logits: torch.Tensor, domain: float, loss_type: AdversarialLoss) -> torch.Tensor:
    """Mean loss of N x 1 x h x w discriminator ``logits`` against the constant map ``domain`` (0 or 1).

    ``vanilla``: binary cross-entropy with logits; ``ls``: mean squared error of the raw logits (the reference
    feeds them to ``MSELoss`` without a sigmoid). Float32 scalar.
    """
    logits = logits.float()
    labels = torch.full_like(logits, domain)
    if loss_type == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if loss_type == "ls":
        return F.mse_loss(logits, labels)
    raise ValueError(f"adversarial loss {loss_type!r}: expected vanilla or ls")


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module``'s parameters do not require gradients (restored afterwards)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def generator_loss(
    discriminator: nn.Module, target_probabilities: torch.Tensor, loss_type: AdversarialLoss
) -> torch.Tensor:
    """``L_adv = loss(D(P_target), source label 0)``; gradients reach the student, never ``D``.

    Args:
        discriminator: the plain ``OutputDiscriminator`` (not a DDP wrapper: its frozen parameters would leave
            DDP's reducer waiting for gradients that never come).
        target_probabilities: N x C x H x W softmax of the student's target logits (with its graph).
        loss_type: ``vanilla`` or ``ls``.
    """
    with frozen_parameters(discriminator):
        logits = discriminator(target_probabilities)
    return domain_loss(logits, SOURCE_DOMAIN, loss_type)


def discriminator_loss(
    discriminator: nn.Module,
    source_probabilities: torch.Tensor,
    target_probabilities: torch.Tensor,
    loss_type: AdversarialLoss,
) -> torch.Tensor:
    """``L_D = loss(D(P_source), 0) + loss(D(P_target), 1)`` on detached probabilities (gradients reach ``D``
    only). Both maps go through one forward (``D`` has no normalisation layer, so this equals two).

    Args:
        discriminator: ``OutputDiscriminator``, plain or DDP-wrapped.
        source_probabilities: N_s x C x H x W.
        target_probabilities: N_t x C x H x W (same H x W).
        loss_type: ``vanilla`` or ``ls``.
    """
    num_source = source_probabilities.shape[0]
    logits = discriminator(torch.cat([source_probabilities.detach(), target_probabilities.detach()]))
    return domain_loss(logits[:num_source], SOURCE_DOMAIN, loss_type) + domain_loss(
        logits[num_source:], TARGET_DOMAIN, loss_type
    )


__all__ = [
    "DISCRIMINATOR_STRIDE",
    "SOURCE_DOMAIN",
    "TARGET_DOMAIN",
    "OutputDiscriminator",
    "discriminator_loss",
    "domain_loss",
    "frozen_parameters",
    "generator_loss",
]
