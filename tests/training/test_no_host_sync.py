"""The trainer's whole adaptation step never synchronises with the host.

One step of the loop (:meth:`Trainer.micro_step`: the batch moved to the device, the views, the teacher targets,
``P_ST``, self-labeling, the label warps, the total loss, the pseudo-label diagnostics, backward, the finite check
and the fused optimisers' steps; then :meth:`Trainer.optimisation_step_done`: schedules, buffers, the EMA update,
the non-finite counters; and the logging window's device-side sums) runs under ``FakeTensorMode``, where every
value read on the host (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.numpy()``) and every data-dependent
shape (``nonzero``, boolean-mask indexing, ``unique``, CPU ``bincount``) raises. On this CPU ``.cpu()`` would be a
no-op, so it is made to raise too. Only ``_log_window`` (the one sync per ``--logging_steps``) is left out, and the
data loading, which happens on the host by design (its batches are fetched before the step).

Where the code takes a CPU-only branch, the test takes the accelerator's: ``evaluation._histogram`` counts with
``bincount`` on CPU (fastest there) and with a fixed-size ``scatter_add_`` elsewhere; the strong view's per-image
ops run on the images that drew them on CPU and on the whole batch elsewhere (``transforms._where_applied``).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from training_helpers import adaptation, prepared

from cpsl_hf import evaluation
from cpsl_hf.data import transforms
from cpsl_hf.training.loop import LogWindow


class HostCopy(RuntimeError):
    """A tensor was copied to the host inside the guarded step."""


def _refuse_host_copy(*args, **kwargs):
    raise HostCopy("Tensor.cpu() inside the training step")


@pytest.fixture
def accelerator_paths(monkeypatch):
    """The branches an accelerator takes, and ``Tensor.cpu`` refused (a no-op on a CPU run, a sync on a GPU)."""
    monkeypatch.setattr(evaluation, "_histogram", evaluation._scatter_histogram)
    monkeypatch.setattr(transforms, "_where_applied", transforms._where_applied_to_batch)


def _guarded_step(trainer, stage):
    """One whole step of ``stage`` under FakeTensorMode; returns the step's (fake) total loss."""
    # The loader decodes on the host (its own business, ahead of the step): fetch one batch of each stream now.
    trainer.source_loader = iter([next(trainer.source_loader)])
    trainer.target_loader = iter([next(trainer.target_loader)])
    window = LogWindow()
    cpu = torch.Tensor.cpu
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.Tensor.cpu = _refuse_host_copy
        try:
            output, images = trainer.micro_step(stage)
            window.add(output.losses, images)
            trainer.optimisation_step_done(stage)
            window.steps += 1
        finally:
            torch.Tensor.cpu = cpu
        loss = output.losses["loss"]
        # the guard is live: a host read or a data-dependent shape fails here
        with pytest.raises(DataDependentOutputException):
            loss.item()
        with pytest.raises(DataDependentOutputException):
            bool(loss > 0)
        with pytest.raises(DynamicOutputShapeException):
            output.pseudo_labels.pseudo_labels[output.pseudo_labels.pseudo_labels > 0]
    return loss


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("--method", "mean_teacher", "--consistency", "symmetric"),
        ("--mix", "classmix", "--mix_prob", "1.0", "--sl_logits_branch", "--rectify_threshold", "0.2"),
        (
            "--pseudo_labels",
            "offline",
            "--max_grad_norm",
            "1.0",
            "--ema_ramp",
            "--prototype_optimizer",
            "adamw",
        ),
    ],
    ids=["cpsl", "mean_teacher", "classmix_logits_branch", "offline_clipped_ramp_adamw_prototypes"],
)
def test_training_step_never_synchronises_with_the_host(tmp_path, flags, accelerator_paths):
    trainer = prepared(tmp_path / "run", tmp_path / "cache", *flags)
    trainer.model.train()
    trainer._prepare_step_skipping()  # as _train does before the loop: fused optimisers that read found_inf
    stage = adaptation(trainer)
    loss = _guarded_step(trainer, stage)
    assert loss.shape == () and trainer.step == 1


def test_the_guard_catches_a_host_copy(tmp_path, accelerator_paths, monkeypatch):
    """A ``.item()`` or ``.cpu()`` slipped into the stage fails the guarded step."""
    trainer = prepared(tmp_path / "run", tmp_path / "cache")
    trainer.model.train()
    trainer._prepare_step_skipping()
    stage = adaptation(trainer)
    total_loss = type(stage).total_loss

    def reads_the_loss(self, *args):
        losses = total_loss(self, *args)
        losses["loss"].detach().cpu()
        return losses

    monkeypatch.setattr(type(stage), "total_loss", reads_the_loss)
    with pytest.raises(HostCopy):
        _guarded_step(trainer, stage)

    def reads_a_value(self, *args):
        losses = total_loss(self, *args)
        float(losses["loss"].detach())
        return losses

    monkeypatch.setattr(type(stage), "total_loss", reads_a_value)
    trainer = prepared(tmp_path / "run2", tmp_path / "cache")
    trainer.model.train()
    with pytest.raises(DataDependentOutputException):
        _guarded_step(trainer, adaptation(trainer))
