"""The warm-up stage: the student learns from the labelled source alone; with ``--warmup_adversarial`` also to
fool an output-space discriminator on target crops (AdaptSegNet; the reference's ``step_adv``)."""

from __future__ import annotations

import torch
from torch import nn

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import normalize
from cpsl_hf.selflabel import masked_cross_entropy
from cpsl_hf.training.adversarial import OutputDiscriminator, discriminator_loss, generator_loss
from cpsl_hf.training.views import cross_entropy_at, upsampled

from .base import Stage, StepOutput


class WarmupStage(Stage):
    """``L_src = CE(student(source crop), labels)`` at label resolution."""

    def __init__(self, steps: int, name: str = "warmup"):
        super().__init__(name, steps)

    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        view = run.views.source(source_batch)
        with run.accelerator.autocast():
            logits = run.model(normalize(view.images)).logits
        loss = cross_entropy_at(logits, view.labels)
        return StepOutput({"loss": loss, "loss_source": loss.detach()})

    def column_title(self, network_name: str) -> str:
        return "warm-up"

    def recipe(self) -> str:
        return f"{self.steps} warm-up"


class AdversarialWarmupStage(WarmupStage):
    """Warm-up with an output-space discriminator ``D`` (AdaptSegNet).

    One student forward on the source crop and the target weak view (no labels); logits upsampled (bilinear) to
    the crop size, as the reference does, then softmax ``P`` (N x C x h x w, float32). The student minimises
    ``L_src + lambda_adv L_adv`` (``D``'s parameters frozen in ``L_adv``); ``D`` then takes its own Adam step on
    ``L_D`` of the detached ``P``, after the student's step (as the reference). ``D``, its Adam and schedule are
    prepared, so ``accelerator.save_state`` checkpoints them with the student's.

    Args:
        steps: warm-up steps.
        lambda_adv: weight of the student's adversarial loss.
        loss_type: ``ls`` (least squares) or ``vanilla`` (binary cross-entropy).
        discriminator_lr: Adam learning rate of ``D`` (it follows the run's schedule).
    """

    needs_target = True

    def __init__(self, steps: int, lambda_adv: float, loss_type: str, discriminator_lr: float):
        super().__init__(steps)
        self.lambda_adv = lambda_adv
        self.loss_type = loss_type
        self.discriminator_lr = discriminator_lr

    def setup(self, run) -> None:
        """Build ``D`` after the student (so the student's initial weights do not depend on the option), its
        Adam and schedule, and prepare them: DDP all-reduces its gradients, checkpoints carry its state."""
        super().setup(run)
        discriminator = OutputDiscriminator(run.num_classes)
        # Fused: a non-finite step of D is skipped on the device through its found_inf (see after_micro_step).
        optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=self.discriminator_lr, betas=(0.9, 0.99), fused=True
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run.lr_factor)
        self.discriminator, self.optimizer, self.scheduler = run.accelerator.prepare(
            discriminator, optimizer, scheduler
        )

    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        source = run.views.source(source_batch)
        target = run.views.target_weak(target_batch)
        num_source = source.images.shape[0]
        with run.accelerator.autocast():
            logits = run.model(normalize(torch.cat([source.images, target.images]))).logits
        logits = upsampled(logits.float(), run.views.crop_size)
        probabilities = logits.softmax(dim=1)
        loss_source = masked_cross_entropy(logits[:num_source], source.labels, IGNORE_INDEX)
        plain_discriminator = run.accelerator.unwrap_model(self.discriminator)
        with run.accelerator.autocast():
            loss_adv = generator_loss(plain_discriminator, probabilities[num_source:], self.loss_type)
            loss_d = discriminator_loss(
                self.discriminator, probabilities[:num_source], probabilities[num_source:], self.loss_type
            )
        losses = {
            "loss": loss_source + self.lambda_adv * loss_adv,
            "loss_discriminator": loss_d,
            "loss_source": loss_source.detach(),
            "loss_adv": loss_adv.detach(),
        }
        return StepOutput(losses)

    def accumulated_modules(self) -> list[nn.Module]:
        return [self.discriminator]

    def after_micro_step(self, output: StepOutput) -> None:
        """Back-propagate ``L_D`` (reaches ``D`` only) and step ``D``'s Adam (skipped while accumulating).

        A non-finite ``L_D`` or gradient of ``D`` (on any process) leaves ``D`` and its Adam state unchanged: the
        fused Adam reads ``found_inf`` on the device, as under ``GradScaler`` (under fp16 the scaler sets it).
        """
        run = self.run
        loss = output.losses["loss_discriminator"]
        run.accelerator.backward(loss)
        if run.accelerator.mixed_precision != "fp16":
            found = (~torch.isfinite(loss.detach())).float()
            grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, found, torch.ones((), device=found.device)
                )
            if run.accelerator.num_processes > 1:
                torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
            self.optimizer.optimizer.found_inf = found
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self) -> None:
        self.scheduler.step()

    def recipe(self) -> str:
        return f"{self.steps} warm-up (output-space adversarial, weight {self.lambda_adv})"
